"""The web side: the Django project (settings, urls, asgi) and its apps."""
