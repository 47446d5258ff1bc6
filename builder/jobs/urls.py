from django.urls import path

from builder.jobs import views

app_name = "jobs"
urlpatterns = [
    path("", views.job_list, name="list"),
    path("new/", views.job_launch, name="launch"),
    path("compare/", views.job_compare, name="compare"),
    path("<int:job_id>/", views.job_detail, name="detail"),
]
