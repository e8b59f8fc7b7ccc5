"""/api/v1/firmware/: releases and rollouts (meters.ota.api)."""

from django.urls import path

from meters.ota import api

urlpatterns = [
    path("releases/", api.ReleaseListView.as_view(), name="api-firmware-releases"),
    path("rollouts/", api.RolloutListView.as_view(), name="api-firmware-rollouts"),
    path("rollouts/<int:id>/", api.RolloutDetailView.as_view(), name="api-firmware-rollout"),
    path("rollouts/<int:id>/meters/", api.RolloutMetersView.as_view(), name="api-firmware-rollout-meters"),
    path("rollouts/<int:id>/advance/", api.RolloutAdvanceView.as_view(), name="api-firmware-rollout-advance"),
    path("rollouts/<int:id>/pause/", api.RolloutPauseView.as_view(), name="api-firmware-rollout-pause"),
    path("rollouts/<int:id>/resume/", api.RolloutResumeView.as_view(), name="api-firmware-rollout-resume"),
    path("rollouts/<int:id>/abort/", api.RolloutAbortView.as_view(), name="api-firmware-rollout-abort"),
]
