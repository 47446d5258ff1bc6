from django.urls import path

from builder.fleet import views

app_name = "fleet"
urlpatterns = [
    path("", views.worker_list, name="list"),
]
