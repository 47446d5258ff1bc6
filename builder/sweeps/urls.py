from django.urls import path

from builder.sweeps import views

app_name = "sweeps"
urlpatterns = [
    path("", views.sweep_list, name="list"),
    path("<int:sweep_id>/", views.sweep_detail, name="detail"),
    path("tune-lr/<int:config_id>/", views.tune_learning_rate, name="tune_lr"),
]
