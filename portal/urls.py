"""URL map: the customer portal, the admin, M-Pesa callbacks and the REST API."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from portal import api, metrics, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("meters/<str:meter_no>/", views.meter_detail, name="meter-detail"),
    path("meters/<str:meter_no>/buy/", views.buy_units, name="buy-units"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("payments/", include("payments.urls")),
    path("firmware/", include("meters.ota.urls")),  # OTA images for meters (meters.ota.views)
    path("api/v1/", include("portal.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^api/", api.not_found),
]
