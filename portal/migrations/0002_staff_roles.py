"""Staff roles as Django groups with their permissions. Code checks permissions, never group
names; a staff member's role is the groups an administrator puts them in (several may apply).

- support: reads everything, resends a meter its balance, looks after customers
- cashier: reads everything, resolves payments (credit, same money, close, query M-Pesa)
- engineer: reads everything, provisions and reassigns meters, relay overrides, register
  resets and held energy, meters' MQTT credentials, resends balances
- supervisor: reads everything, balance adjustments and approving another's large one, tariffs
"""

from django.contrib.auth.management import create_permissions
from django.db import migrations

READ = [
    ("meters", ["view_customer", "view_tariff", "view_meter", "view_ledgerentry", "view_reading", "view_statusevent",
                "view_metercommand", "view_firebasemirror", "view_registerhistory", "view_metercredential",
                "view_adjustmentrequest"]),
    ("payments", ["view_payment", "view_callback", "view_paymentaudit"]),
    ("mqtt_worker", ["view_deadletter"]),
    ("notifications", ["view_notification"]),
]
ROLES = {
    "support": [("meters", ["resend_balance", "add_customer", "change_customer"])],
    "cashier": [("payments", ["change_payment"])],
    "engineer": [("meters", ["add_meter", "change_meter", "command_relay", "review_registers", "manage_credentials",
                             "resend_balance"])],
    "supervisor": [("meters", ["adjust_balance", "approve_adjustment", "add_tariff"])],
}


def create_roles(apps, schema_editor):
    # Permissions are normally created after all migrations (post_migrate); these need them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, grants in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        for app_label, codenames in READ + grants:
            permissions = Permission.objects.filter(content_type__app_label=app_label, codename__in=codenames)
            missing = set(codenames) - set(permissions.values_list("codename", flat=True))
            if missing:
                raise RuntimeError(f"staff roles: no permissions {sorted(missing)} in {app_label}")
            group.permissions.add(*permissions)


def remove_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("meters", "0008_production"),
        ("payments", "0002_money_by_any_route"),
        ("mqtt_worker", "0002_broker_service_users"),
        ("notifications", "0001_initial"),
    ]

    operations = [migrations.RunPython(create_roles, remove_roles)]
