from django.urls import path

from builder.checkpoints import views

app_name = "checkpoints"
urlpatterns = [
    path("", views.checkpoint_list, name="list"),
    path("<int:checkpoint_id>/", views.checkpoint_detail, name="detail"),
    path("<int:checkpoint_id>/configure/", views.save_as_config, name="configure"),
]
