"""Firmware updates in the REST API (/api/v1/firmware/): the same releases, rollouts and actions
as the staff pages, through the same services and selectors.

Staff only, with Django model permissions (as the admin): reading needs `view_firmwarerelease` /
`view_rollout`, uploading `add_firmwarerelease`, starting a rollout `add_rollout`, advancing,
pausing, resuming and aborting one `change_rollout`.
"""

from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, permissions, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import Text
from core.rules import FW_VERSION_HELP, FW_VERSION_PATTERN, METER_NO_HELP, METER_NO_REGEX
from meters.ota import selectors, services
from meters.ota.models import MAX_IMAGE_BYTES

ERROR_FIELDS = {
    "test_meter_no": "testMeterNo", "meter_nos": "meterNos", "failure_percent": "failurePercent",
    "silence_timeout_s": "silenceTimeoutS", "max_in_flight": "maxInFlight", "image": "image",
}


def staff_with(read: str, write: str):
    """is_staff plus a model permission: `read` for safe methods, `write` for the others."""

    class StaffWith(permissions.BasePermission):
        message = "Only utility staff with the permission for this may do it"

        def has_permission(self, request, view) -> bool:
            user = request.user
            needed = read if request.method in permissions.SAFE_METHODS else write
            return bool(user and user.is_authenticated and user.is_staff and user.has_perm(needed))

    return StaffWith


class ReleaseSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    version = serializers.CharField()
    sizeBytes = serializers.IntegerField(source="size_bytes")
    sha256 = serializers.CharField(help_text="Computed by the backend from the image")
    signature = serializers.CharField()
    keyFingerprint = serializers.CharField(source="key_fingerprint", help_text="The key the signature was checked with")
    imageUrl = serializers.SerializerMethodField(help_text="What meters are sent")
    notes = serializers.CharField()
    uploadedBy = serializers.CharField(source="uploaded_by")
    uploadedAt = serializers.DateTimeField(source="uploaded_at")

    def get_imageUrl(self, release) -> str:
        return services.release_image_url(release)


class ReleaseUploadSerializer(serializers.Serializer):
    version = Text(max_length=31, help_text=f"What the image reports as fw ({FW_VERSION_HELP})",
                   validators=[RegexValidator(rf"^{FW_VERSION_PATTERN}$")])
    image = serializers.FileField(help_text=f"The image file, at most {MAX_IMAGE_BYTES} bytes")
    signature = Text(max_length=100, help_text="`signature` printed by firmware/tools/sign_firmware.py sign")
    notes = Text(required=False, allow_blank=True, default="", max_length=2000)


class ProgressSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    waiting = serializers.IntegerField()
    inFlight = serializers.IntegerField(source="in_flight")
    updated = serializers.IntegerField()
    failed = serializers.IntegerField(help_text="Failed, rolled back or timed out")
    skipped = serializers.IntegerField()
    countedCommanded = serializers.IntegerField(source="counted_commanded", help_text="Sent it since the start or last resume")
    countedFailed = serializers.IntegerField(source="counted_failed", help_text="Of those, failed: the pause rule's share")


class EventSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    actor = serializers.CharField()
    action = serializers.CharField()
    note = serializers.CharField()


class RolloutSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    release = serializers.IntegerField(source="release_id")
    version = serializers.CharField(source="release.version")
    state = serializers.CharField(help_text="running, paused, completed or aborted")
    pausedReason = serializers.CharField(source="paused_reason")
    failurePercent = serializers.IntegerField(source="failure_percent")
    silenceTimeoutS = serializers.IntegerField(source="silence_timeout_s")
    maxInFlight = serializers.IntegerField(source="max_in_flight")
    coveragePercent = serializers.IntegerField(source="coverage_percent")
    stages = serializers.IntegerField()
    progress = serializers.SerializerMethodField()
    createdBy = serializers.CharField(source="created_by")
    createdAt = serializers.DateTimeField(source="created_at")
    finishedAt = serializers.DateTimeField(source="finished_at", allow_null=True)

    @extend_schema_field(ProgressSerializer)
    def get_progress(self, rollout) -> dict:
        return ProgressSerializer(selectors.rollout_progress(rollout)).data


class RolloutDetailSerializer(RolloutSerializer):
    events = EventSerializer(many=True, source="events.all")


class RolloutStartSerializer(serializers.Serializer):
    release = serializers.IntegerField(min_value=1)
    testMeterNo = Text(validators=[RegexValidator(METER_NO_REGEX)], help_text=METER_NO_HELP)
    failurePercent = serializers.IntegerField(min_value=0, max_value=100, required=False)
    silenceTimeoutS = serializers.IntegerField(min_value=60, max_value=2**31 - 1, required=False)
    maxInFlight = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)


class AdvanceSerializer(serializers.Serializer):
    percent = serializers.IntegerField(min_value=1, max_value=100, required=False,
                                       help_text="Cover this percent of the fleet (cumulative)")
    meterNos = serializers.ListField(child=Text(validators=[RegexValidator(METER_NO_REGEX)]),
                                     required=False, min_length=1, max_length=services.MAX_LIST)

    def validate(self, data):
        if ("percent" in data) == ("meterNos" in data):
            raise serializers.ValidationError("Give either percent or meterNos")
        return data


class NoteSerializer(serializers.Serializer):
    note = Text(required=False, allow_blank=True, default="", max_length=400)


class TargetSerializer(serializers.Serializer):
    meterNo = serializers.CharField(source="meter.meter_no")
    version = serializers.CharField(source="meter.firmware", help_text="What the meter runs now (its latest status)")
    state = serializers.CharField(
        help_text="waiting, commanded, downloading, verifying, rebooting, pending, updated, failed, rolledback, "
                  "timeout or skipped")
    otaState = serializers.CharField(source="reported_ota_state", help_text="The meter's last otaState about it")
    error = serializers.CharField()
    stage = serializers.IntegerField()
    position = serializers.IntegerField()
    commandedAt = serializers.DateTimeField(source="commanded_at", allow_null=True)
    progressAt = serializers.DateTimeField(source="progress_at", allow_null=True)
    finishedAt = serializers.DateTimeField(source="finished_at", allow_null=True)


class ReleaseListView(generics.GenericAPIView):
    permission_classes = [staff_with("meters.view_firmwarerelease", "meters.add_firmwarerelease")]
    serializer_class = ReleaseSerializer
    error_field_names = ERROR_FIELDS

    def get_parsers(self):
        # The upload is a file: multipart/form-data (a JSON body would carry it base64-inflated).
        if getattr(self, "request", None) is not None and self.request.method == "POST":
            return [MultiPartParser()]
        return super().get_parsers()

    @extend_schema(summary="Firmware releases, newest first (staff)", responses=ReleaseSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(selectors.releases_list())
        return self.get_paginated_response(ReleaseSerializer(page, many=True).data)

    @extend_schema(summary="Upload a signed release (staff); the signature is checked with OTA_PUBLIC_KEY",
                   request={"multipart/form-data": ReleaseUploadSerializer}, responses={201: ReleaseSerializer})
    def post(self, request):
        data = ReleaseUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        upload = values["image"]
        if upload.size > MAX_IMAGE_BYTES:
            raise serializers.ValidationError({"image": [f"At most {MAX_IMAGE_BYTES} bytes"]})
        release = services.release_create(version=values["version"], image=upload.read(), signature=values["signature"],
                                          actor=request.user, notes=values["notes"])
        return Response(ReleaseSerializer(release).data, status=status.HTTP_201_CREATED)


class RolloutListView(generics.GenericAPIView):
    permission_classes = [staff_with("meters.view_rollout", "meters.add_rollout")]
    serializer_class = RolloutSerializer
    error_field_names = ERROR_FIELDS
    may_not_find = ("POST",)

    @extend_schema(summary="Rollouts, newest first (staff)", responses=RolloutSerializer(many=True))
    def get(self, request):
        page = self.paginate_queryset(selectors.rollouts_list())
        return self.get_paginated_response(RolloutSerializer(page, many=True).data)

    @extend_schema(summary="Start a rollout: the release to one test meter (staff)", request=RolloutStartSerializer,
                   responses={201: RolloutDetailSerializer})
    def post(self, request):
        data = RolloutStartSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        rollout = services.rollout_start(
            release_id=values["release"], test_meter_no=values["testMeterNo"], actor=request.user,
            failure_percent=values.get("failurePercent"), silence_timeout_s=values.get("silenceTimeoutS"),
            max_in_flight=values.get("maxInFlight"),
        )
        return Response(RolloutDetailSerializer(selectors.rollout_get(rollout_id=rollout.pk)).data, status=201)


class RolloutView(APIView):
    permission_classes = [staff_with("meters.view_rollout", "meters.change_rollout")]
    error_field_names = ERROR_FIELDS

    def respond(self):
        return Response(RolloutDetailSerializer(selectors.rollout_get(rollout_id=self.kwargs["id"])).data)


class RolloutDetailView(RolloutView):
    @extend_schema(summary="One rollout, with its history (staff)", responses=RolloutDetailSerializer)
    def get(self, request, id):
        return self.respond()


class RolloutMetersView(RolloutView, generics.GenericAPIView):
    serializer_class = TargetSerializer

    @extend_schema(summary="Each meter of a rollout: its version now and its state in the update (staff)",
                   responses=TargetSerializer(many=True))
    def get(self, request, id):
        rollout = selectors.rollout_get(rollout_id=id)
        page = self.paginate_queryset(selectors.rollout_targets(rollout))
        return self.get_paginated_response(TargetSerializer(page, many=True).data)


class RolloutAdvanceView(RolloutView):
    @extend_schema(summary="Advance a rollout to a share of the fleet or a list of meters (staff)",
                   request=AdvanceSerializer, responses=RolloutDetailSerializer)
    def post(self, request, id):
        data = AdvanceSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.rollout_advance(rollout_id=id, actor=request.user, percent=data.validated_data.get("percent"),
                                 meter_nos=data.validated_data.get("meterNos"))
        return self.respond()


class _NoteAction(RolloutView):
    service = None

    def post(self, request, id):
        data = NoteSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        type(self).service(rollout_id=id, actor=request.user, note=data.validated_data["note"])
        return self.respond()


class RolloutPauseView(_NoteAction):
    service = services.rollout_pause

    @extend_schema(summary="Pause a rollout (staff)", request=NoteSerializer, responses=RolloutDetailSerializer)
    def post(self, request, id):
        return super().post(request, id)


class RolloutResumeView(_NoteAction):
    service = services.rollout_resume

    @extend_schema(summary="Resume a paused rollout; failures are counted afresh (staff)", request=NoteSerializer,
                   responses=RolloutDetailSerializer)
    def post(self, request, id):
        return super().post(request, id)


class RolloutAbortView(_NoteAction):
    service = services.rollout_abort

    @extend_schema(summary="Abort a rollout: meters not yet sent it are skipped (staff)", request=NoteSerializer,
                   responses=RolloutDetailSerializer)
    def post(self, request, id):
        return super().post(request, id)
