from django.contrib import admin
from django.urls import path

from pf_django_site import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("seen/", views.seen),
    path("caf\u00e9/<str:word>/", views.seen),
    path("form/", views.form),
    path("form/done/", views.done, name="done"),
    path("cookies/", views.cookies),
    path("upload/", views.upload),
    path("stream/", views.stream),
    path("file/", views.file),
    path("large/", views.large),
    path("boom/", views.boom),
    path("hello/", views.hello),
]
