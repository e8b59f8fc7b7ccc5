"""Daraja callback URLs. The paths are a contract with Safaricom (registered C2B URLs, the STK
CallBackURL): they must not contain "mpesa", "safaricom", "query", "sql", "exe" or "cmd"."""

from django.urls import path

from payments import views

app_name = "payments"

urlpatterns = [
    path("callbacks/stk/<str:secret>/", views.stk_callback, name="stk-callback"),
    path("callbacks/c2b/validation/<str:secret>/", views.c2b_validation, name="c2b-validation"),
    path("callbacks/c2b/confirmation/<str:secret>/", views.c2b_confirmation, name="c2b-confirmation"),
]
