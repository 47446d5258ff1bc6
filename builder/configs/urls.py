from django.urls import path

from builder.configs import views

app_name = "configs"
urlpatterns = [
    path("", views.index, name="index"),
    path("wizard/", views.wizard, name="wizard"),
    path("wizard/estimate/", views.wizard_estimate, name="wizard_estimate"),
    path("wizard/save/", views.wizard_save, name="wizard_save"),
    path("editor/", views.editor, name="editor"),
    path("estimate/", views.estimate_panel, name="estimate_panel"),
    path("compare/", views.compare, name="compare"),
    path("<int:config_id>/", views.detail, name="detail"),
    path("<int:config_id>/edit/", views.editor, name="edit"),
    path("<int:config_id>/delete/", views.delete, name="delete"),
]
