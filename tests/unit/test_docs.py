"""The reference docs name every setting and subject the code has, so they cannot drift."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from membrane.registry import SERVICES
from shared import subjects
from shared.config import env_name, flag_name

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for entry in SERVICES.values():
        for field in dataclasses.fields(entry.settings):
            assert f"`{env_name(field.name)}`" in text, env_name(field.name)
            assert f"`{flag_name(field.name)}`" in text, flag_name(field.name)


def test_every_request_subject_is_documented() -> None:
    text = (DOCS / "bus.md").read_text()
    for name in dir(subjects):
        value = getattr(subjects, name)
        if isinstance(value, str) and value.startswith("membrane.") and value.count(".") >= 2:
            assert f"`{value}`" in text, value
