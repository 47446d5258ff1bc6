from django.urls import path

from builder.datasets import views

app_name = "datasets"
urlpatterns = [
    path("", views.dataset_list, name="list"),
    path("<int:dataset_id>/", views.dataset_detail, name="detail"),
    path("<int:dataset_id>/status", views.dataset_status, name="status"),
    path("<int:dataset_id>/download/<slug:part>", views.dataset_download, name="download"),
    path("<int:dataset_id>/clean", views.dataset_clean, name="clean"),
    path("<int:dataset_id>/analyze", views.dataset_analyze, name="analyze"),
    path("<int:dataset_id>/fields", views.dataset_fields, name="fields"),
    path("<int:dataset_id>/delete", views.dataset_delete, name="delete"),
]
