from django.urls import path

from builder.reports import views

app_name = "reports"
urlpatterns = [
    path("", views.report_list, name="list"),
    path("<int:report_id>/", views.report_detail, name="detail"),
    path("<int:report_id>/playground/", views.playground, name="playground"),
    path("evaluate/<int:job_id>/", views.evaluate_job, name="evaluate"),
]
