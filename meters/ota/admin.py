"""Staff pages for firmware updates: releases (upload, then "roll out to a test meter"),
rollouts (their meters' versions and states; advance, pause, resume, abort) and every meter's
part in a rollout. Every action goes through meters.ota.services.

Permissions are Django model permissions on top of `is_staff`, so that staff roles (groups)
can grant them: uploading a release needs `meters.add_firmwarerelease`, starting a rollout
`meters.add_rollout`, advancing, pausing, resuming and aborting one `meters.change_rollout`;
seeing them, the `view_` permissions.
"""

from django import forms
from django.contrib import admin, messages
from django.db.models import Count
from django.shortcuts import render
from django.urls import reverse
from django.utils.html import format_html

from core.admin import ReadOnlyAdmin, ReadOnlyMixin
from core.errors import DomainError
from core.rules import METER_NO_HELP
from meters.ota import selectors, services
from meters.ota.models import MAX_IMAGE_BYTES, FirmwareRelease, Rollout, RolloutEvent, RolloutTarget

# The meters shown on a rollout's page; the full list is the rollout's filtered target list.
INLINE_TARGETS = 200


class ReleaseUploadForm(forms.ModelForm):
    """The upload: the form calls the service (sha256, signature check against OTA_PUBLIC_KEY)
    in clean(), so that a refused release is shown on the form with the reason."""

    image_file = forms.FileField(label="Image", help_text="The .bin the build produced (firmware.bin)")

    class Meta:
        model = FirmwareRelease
        fields = ["version", "signature", "notes"]
        help_texts = {
            "signature": "`signature` printed by python firmware/tools/sign_firmware.py sign --key KEY --version V IMAGE",
        }

    actor = None  # set by the admin for each request
    created: FirmwareRelease | None = None

    def clean(self):
        data = super().clean()
        upload = data.get("image_file")
        if self.errors or upload is None:
            return data
        if upload.size > MAX_IMAGE_BYTES:
            self.add_error("image_file", f"The image has {upload.size} bytes; an OTA slot holds {MAX_IMAGE_BYTES}")
            return data
        try:
            self.created = services.release_create(
                version=data["version"], image=upload.read(), signature=data.get("signature") or "",
                actor=self.actor, notes=data.get("notes") or "",
            )
        except DomainError as error:
            field = error.field if error.field in ("version", "signature", "notes") else None
            self.add_error(field if field else ("image_file" if error.field == "image" else None), error.message)
        return data

    def validate_unique(self):
        pass  # the service decides (and says why)


class StartRolloutForm(forms.Form):
    test_meter_no = forms.CharField(max_length=32, label="Test meter", help_text=f"Meter number ({METER_NO_HELP})")
    failure_percent = forms.IntegerField(
        min_value=0, max_value=100, required=False,
        help_text="Pause when more than this percent of the meters sent the update fail (default OTA_PAUSE_FAILURE_PERCENT)",
    )
    silence_timeout_s = forms.IntegerField(
        min_value=60, required=False, help_text="Seconds without news after which a meter counts as failed "
                                                "(default OTA_SILENCE_TIMEOUT_S)",
    )
    max_in_flight = forms.IntegerField(min_value=1, required=False,
                                       help_text="Meters updating at once (default OTA_MAX_IN_FLIGHT)")


class AdvanceForm(forms.Form):
    percent = forms.IntegerField(min_value=1, max_value=100, required=False,
                                 help_text="Cover this percent of the fleet (cumulative: 50 = half of all meters)")
    meter_nos = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False, label="Or these meters",
                                help_text="Meter numbers, separated by commas, spaces or new lines")

    def clean(self):
        data = super().clean()
        if (data.get("percent") is None) == (not (data.get("meter_nos") or "").strip()):
            raise forms.ValidationError("Give either a percentage or a list of meters")
        return data


class NoteForm(forms.Form):
    note = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, help_text="Why (kept with the rollout)")


def _form_page(admin_obj, request, queryset, *, title: str, form, intro: str = ""):
    return render(request, "admin/meters/ota_action.html", {
        **admin_obj.admin_site.each_context(request), "title": title, "intro": intro, "objects": queryset, "form": form,
        "action": request.POST.get("action"), "opts": admin_obj.model._meta,
    })


def _staff_may(request, perm: str) -> bool:
    return bool(request.user.is_active and request.user.is_staff and request.user.has_perm(perm))


@admin.register(FirmwareRelease)
class FirmwareReleaseAdmin(admin.ModelAdmin):
    list_display = ["version", "size_bytes", "sha256", "key_fingerprint", "uploaded_by", "uploaded_at", "rollout_count"]
    search_fields = ["version", "sha256", "notes"]
    readonly_fields = ["version", "size_bytes", "sha256", "signature", "key_fingerprint", "image_url", "uploaded_by",
                       "uploaded_at", "notes"]
    actions = ["start_rollout"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("image").annotate(rollouts_n=Count("rollouts"))

    @admin.display(description="rollouts", ordering="rollouts_n")
    def rollout_count(self, obj):
        return obj.rollouts_n

    @admin.display(description="image URL (sent to meters)")
    def image_url(self, obj):
        return services.release_image_url(obj)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ReleaseUploadForm
            kwargs["fields"] = ["version", "image_file", "signature", "notes"]
            form = super().get_form(request, obj, **kwargs)
            form.actor = request.user
            return form
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request, obj=None):
        return ["version", "image_file", "signature", "notes"] if obj is None else self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def has_add_permission(self, request):
        return _staff_may(request, "meters.add_firmwarerelease")

    def has_change_permission(self, request, obj=None):
        return False  # a release is what was signed: never edited

    def has_delete_permission(self, request, obj=None):
        return False  # rollouts and commands refer to it

    def has_start_permission(self, request):
        return _staff_may(request, "meters.add_rollout")

    def save_model(self, request, obj, form, change):
        # The service created the row in the form's clean() (inside the admin's transaction).
        obj.pk = form.created.pk
        obj.version = form.created.version

    def save_related(self, request, form, formsets, change):
        pass

    @admin.action(description="Roll out to one test meter", permissions=["start"])
    def start_rollout(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one release to roll out.", messages.ERROR)
            return None
        release = queryset.get()
        if "apply" in request.POST:
            form = StartRolloutForm(request.POST)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    rollout = services.rollout_start(
                        release_id=release.pk, test_meter_no=data["test_meter_no"].strip(), actor=request.user,
                        failure_percent=data.get("failure_percent"), silence_timeout_s=data.get("silence_timeout_s"),
                        max_in_flight=data.get("max_in_flight"),
                    )
                except DomainError as error:
                    self.message_user(request, error.message, messages.ERROR)
                    return None
                self.message_user(request, f"{rollout} started: the test meter has been sent the update.", messages.SUCCESS)
                return None
        else:
            form = StartRolloutForm()
        return _form_page(self, request, queryset, title=f"Roll out {release.version}", form=form,
                          intro="First to one test meter; advance to more meters once it has updated.")


class RolloutTargetInline(ReadOnlyMixin, admin.TabularInline):
    model = RolloutTarget
    fields = ["position", "stage", "meter_link", "meter_firmware", "state", "reported_ota_state", "error", "command_status",
              "commanded_at", "progress_at", "finished_at"]
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = f"meters (the first {INLINE_TARGETS}; the rollout's meter list has all)"

    def get_queryset(self, request):
        queryset = super().get_queryset(request).select_related("meter", "command").order_by("position")
        # Inlines cannot paginate: the first INLINE_TARGETS positions only.
        ids = list(queryset.values_list("id", flat=True)[:INLINE_TARGETS])
        return queryset.filter(id__in=ids)

    @admin.display(description="meter")
    def meter_link(self, obj):
        return format_html('<a href="{}">{}</a>', reverse("admin:meters_meter_change", args=[obj.meter_id]),
                           obj.meter.meter_no)

    @admin.display(description="version now")
    def meter_firmware(self, obj):
        return obj.meter.firmware or "?"

    @admin.display(description="command")
    def command_status(self, obj):
        return obj.command.status if obj.command else "-"


class RolloutEventInline(ReadOnlyMixin, admin.TabularInline):
    model = RolloutEvent
    fields = ["at", "actor", "action", "note"]
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    verbose_name_plural = "history"


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ["__str__", "release", "state", "progress", "failure_share", "coverage_percent", "paused_reason",
                    "created_by", "created_at"]
    list_filter = ["state"]
    list_select_related = ["release"]
    fields = ["release", "state", "progress", "failure_share", "coverage_percent", "stages", "failure_percent",
              "silence_timeout_s", "max_in_flight", "health_since", "paused_reason", "created_by", "created_at",
              "finished_at", "all_meters"]
    readonly_fields = fields
    inlines = [RolloutTargetInline, RolloutEventInline]
    actions = ["advance", "pause", "resume", "abort"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("release__image")

    @admin.display(description="meters")
    def progress(self, obj):
        p = selectors.rollout_progress(obj)
        return (f"{p.total} in it: {p.updated} updated, {p.in_flight} updating, {p.failed} failed, "
                f"{p.waiting} waiting" + (f", {p.skipped} skipped" if p.skipped else ""))

    @admin.display(description="failed (counted for the pause)")
    def failure_share(self, obj):
        p = selectors.rollout_progress(obj)
        return f"{p.counted_failed} of {p.counted_commanded} ({p.failure_percent:.0f} %; pauses above {obj.failure_percent} %)"

    @admin.display(description="every meter")
    def all_meters(self, obj):
        url = reverse("admin:meters_rollouttarget_changelist") + f"?rollout__id__exact={obj.pk}"
        return format_html('<a href="{}">all meters of this rollout</a>', url)

    def has_add_permission(self, request):
        return False  # started from a release ("Roll out to one test meter")

    def has_change_permission(self, request, obj=None):
        return False  # changed only by the actions below

    def has_delete_permission(self, request, obj=None):
        return False

    def has_operate_permission(self, request):
        return _staff_may(request, "meters.change_rollout")

    def _each(self, request, queryset, *, title: str, done: str, call):
        if "apply" in request.POST:
            form = NoteForm(request.POST)
            if form.is_valid():
                for rollout in queryset:
                    try:
                        call(rollout_id=rollout.pk, actor=request.user, note=form.cleaned_data["note"])
                    except DomainError as error:
                        self.message_user(request, error.message, messages.ERROR)
                        continue
                    self.message_user(request, f"{rollout}: {done}", messages.SUCCESS)
                return None
        else:
            form = NoteForm()
        return _form_page(self, request, queryset, title=title, form=form)

    @admin.action(description="Advance: to a share of the fleet or a list of meters", permissions=["operate"])
    def advance(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one rollout to advance.", messages.ERROR)
            return None
        rollout = queryset.get()
        if "apply" in request.POST:
            form = AdvanceForm(request.POST)
            if form.is_valid():
                data = form.cleaned_data
                names = [n for n in (data.get("meter_nos") or "").replace(",", " ").split() if n]
                try:
                    targets = services.rollout_advance(
                        rollout_id=rollout.pk, actor=request.user, percent=data.get("percent"),
                        meter_nos=names if data.get("percent") is None else None,
                    )
                except DomainError as error:
                    self.message_user(request, error.message, messages.ERROR)
                    return None
                self.message_user(request, f"{rollout}: {len(targets)} more meter(s) in the rollout.", messages.SUCCESS)
                return None
        else:
            form = AdvanceForm()
        return _form_page(self, request, queryset, title=f"Advance {rollout}", form=form,
                          intro="Meters are sent the update a few at a time; the rollout pauses itself if too many fail.")

    @admin.action(description="Pause", permissions=["operate"])
    def pause(self, request, queryset):
        return self._each(request, queryset, title="Pause rollouts", done="paused", call=services.rollout_pause)

    @admin.action(description="Resume (failures are counted afresh)", permissions=["operate"])
    def resume(self, request, queryset):
        return self._each(request, queryset, title="Resume rollouts", done="resumed", call=services.rollout_resume)

    @admin.action(description="Abort (meters not yet sent it are skipped)", permissions=["operate"])
    def abort(self, request, queryset):
        return self._each(request, queryset, title="Abort rollouts", done="aborted", call=services.rollout_abort)


@admin.register(RolloutTarget)
class RolloutTargetAdmin(ReadOnlyAdmin):
    """Every meter's part in a rollout: its version now, its state in the update, the error."""

    list_display = ["meter", "rollout", "stage", "position", "meter_firmware", "state", "reported_ota_state", "error",
                    "commanded_at", "progress_at", "finished_at"]
    list_filter = ["state", "stage", "rollout"]
    search_fields = ["meter__meter_no"]
    list_select_related = ["meter", "rollout__release"]
    ordering = ["rollout_id", "position"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("rollout__release__image")

    @admin.display(description="version now", ordering="meter__firmware")
    def meter_firmware(self, obj):
        return obj.meter.firmware or "?"
