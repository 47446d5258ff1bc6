"""Response shapes of the fleet API (published in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers


class HardwareClassSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(help_text="The class, which is also its Celery queue: give it as a launch's queue.")
    profile = serializers.CharField(help_text="Hardware profile of its devices (GET /api/hardware).")
    device_type = serializers.ChoiceField(choices=["cuda", "cpu"])
    device_name = serializers.CharField()
    devices = serializers.IntegerField(help_text="Devices one worker of the class has (processes, on a CPU).")
    memory_bytes = serializers.IntegerField(help_text="Memory of one device (a CPU's: the machine's RAM).")
    bf16 = serializers.BooleanField()
    default = serializers.BooleanField(help_text="The class a launch that names none trains on.")
    live_workers = serializers.IntegerField(help_text="Workers taking this class now (heartbeat within 3 beats).")


class WorkerHardwareSerializer(serializers.Serializer[dict[str, Any]]):
    device_type = serializers.CharField(help_text="cuda, cpu, or unknown (with error) when detection failed.")
    count = serializers.IntegerField(required=False)
    name = serializers.CharField(required=False)
    memory_bytes = serializers.IntegerField(required=False, help_text="Per device (a CPU's: the machine's RAM).")
    bf16 = serializers.BooleanField(required=False)
    bf16_units = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="On a CPU: its units that multiply bf16 natively (AMX, AVX-512 BF16); empty without them.",
    )


class CurrentJobSerializer(serializers.Serializer[dict[str, Any]]):
    visible = serializers.BooleanField(help_text="False: another user's job (neither name nor id is shown).")
    id = serializers.IntegerField(required=False)
    name = serializers.CharField(required=False)
    url = serializers.CharField(required=False)


class QueueClassSerializer(serializers.Serializer[dict[str, Any]]):
    queue = serializers.CharField(help_text="A queue the worker consumes.")
    device_type = serializers.ChoiceField(
        choices=["cuda", "cpu", "none"], help_text="What its hardware class trains on; none: no class is named so."
    )
    devices = serializers.CharField(help_text="'on CPU', 'on 8 × NVIDIA A100 80 GB' or 'not a hardware class'.")


class WorkerSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(help_text="Celery node name.")
    state = serializers.ChoiceField(choices=["live", "silent", "stopped"])
    queues = serializers.ListField(child=serializers.CharField())
    classes = QueueClassSerializer(
        many=True, help_text="Each queue with what its class trains on (a class named gpu may train on the CPU)."
    )
    hardware = WorkerHardwareSerializer()
    hardware_text = serializers.CharField()
    mismatches = serializers.ListField(child=serializers.CharField())
    jobs = CurrentJobSerializer(many=True, help_text="What it trains now: one per busy pool process.")
    heartbeat_at = serializers.DateTimeField()
    heartbeat_age_s = serializers.FloatField()
    started_at = serializers.DateTimeField()
