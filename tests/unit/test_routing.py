"""Routing a job to a model from the workers' heartbeats (no Redis: the heartbeats are given)."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import ConfigurationError, NoWorker, UnknownModel
from service.gateway import fleet
from service.jobs.registry import WorkerHeartbeat
from service.settings import Settings
from workers.worker import served_model


def worker(model: str, *modes: str, state: str = "ready", **extra: Any) -> WorkerHeartbeat:
    return WorkerHeartbeat.model_validate(
        {"id": f"{model}-{len(modes)}-{state}", "model": model, "modes": list(modes), "state": state, **extra}
    )


def like(beat: WorkerHeartbeat, **changes: Any) -> WorkerHeartbeat:
    return beat.model_copy(update=changes)


FLUX = worker("flux", "t2i")
SDXL = worker("sdxl", "t2i")
KONTEXT = worker("kontext", "edit")


def test_a_named_model_that_a_live_worker_serves_is_taken_as_named() -> None:
    assert fleet.route([FLUX, SDXL], "t2i", "sdxl", {}, 15) == "sdxl"


def test_without_a_model_the_job_goes_to_the_model_most_workers_serve_for_its_mode() -> None:
    assert fleet.route([FLUX, SDXL, like(SDXL, id="s2"), KONTEXT], "t2i", None, {}, 15) == "sdxl"
    assert fleet.route([FLUX, SDXL, like(SDXL, id="s2"), KONTEXT], "edit", None, {}, 15) == "kontext"
    assert fleet.route([SDXL, FLUX], "t2i", None, {}, 15) == "flux", "a tie goes to the first name"


def test_a_configured_default_wins_over_the_most_served_model() -> None:
    workers = [FLUX, SDXL, like(SDXL, id="s2")]
    assert fleet.route(workers, "t2i", None, {"t2i": "flux"}, 15) == "flux"


def test_an_unknown_model_is_refused_listing_the_served_ones_for_the_mode() -> None:
    with pytest.raises(UnknownModel) as refused:
        fleet.route([FLUX, SDXL, KONTEXT], "t2i", "no-such-model", {}, 15)
    assert refused.value.status_code == 422 and refused.value.field == "model"
    assert refused.value.choices == ["flux", "sdxl"]
    assert "no-such-model" in refused.value.message and "flux, sdxl" in refused.value.message


def test_a_model_served_only_for_the_other_mode_is_unknown_for_this_one() -> None:
    with pytest.raises(UnknownModel) as refused:
        fleet.route([FLUX, KONTEXT], "edit", "flux", {}, 15)
    assert refused.value.choices == ["kontext"]


def test_a_model_whose_workers_are_not_ready_is_a_retryable_503_with_their_reason() -> None:
    unfit = worker("flux-dev", state="unfit", reason="flux-dev does not fit on cuda:0: 33.1 GiB needed")
    with pytest.raises(NoWorker) as refused:
        fleet.route([FLUX, unfit], "t2i", "flux-dev", {}, 15)
    assert refused.value.retryable and "33.1 GiB needed" in refused.value.message


def test_a_known_model_or_a_configured_default_with_no_live_worker_is_a_503_not_a_422() -> None:
    for defaults, known in (({}, True), ({"t2i": "flux-dev"}, False)):
        with pytest.raises(NoWorker) as refused:
            fleet.route([FLUX], "t2i", "flux-dev", defaults, 15, known=known)
        assert refused.value.retryable and "flux-dev" in refused.value.message
        assert "live workers serve flux for it" in refused.value.message


def test_an_empty_fleet_is_a_503_whatever_the_request_names() -> None:
    for named in (None, "flux"):
        with pytest.raises(NoWorker, match="no worker has sent a heartbeat"):
            fleet.route([], "t2i", named, {}, 15)


def test_a_configured_default_nobody_serves_is_a_503_naming_it() -> None:
    with pytest.raises(NoWorker, match="model 'flux-dev'"):
        fleet.route([FLUX], "t2i", None, {"t2i": "flux-dev"}, 15)


def test_the_model_list_counts_ready_workers_and_marks_defaults() -> None:
    unfit = worker("flux", state="unfit", reason="no room")
    workers = [FLUX, like(FLUX, id="f2", defaults={"steps": 4}), SDXL, KONTEXT, unfit]
    listed = {m["id"]: m for m in fleet.model_list(workers, {}, created=0)}
    assert list(listed) == ["flux", "kontext", "sdxl"]
    assert listed["flux"]["object"] == "model" and listed["flux"]["owned_by"] == "gcr"
    assert listed["flux"]["gcr"]["workers"] == 2 and listed["flux"]["gcr"]["default_for"] == ["t2i"]
    assert listed["kontext"]["gcr"]["default_for"] == ["edit"] and listed["sdxl"]["gcr"]["default_for"] == []


def test_model_readiness_reports_unready_models_with_their_reasons() -> None:
    unfit = worker("flux-dev", state="unfit", reason="no room")
    report = fleet.model_readiness([FLUX, unfit])
    assert report["flux"] == {"ready": True, "modes": ["t2i"], "workers": [FLUX.id]}
    assert report["flux-dev"]["ready"] is False and report["flux-dev"]["reasons"] == ["no room"]


def test_a_worker_whose_generator_name_cannot_route_asks_for_a_model_name() -> None:
    assert served_model(Settings(), "black-forest-labs/FLUX.1-schnell") == "black-forest-labs/FLUX.1-schnell"
    assert served_model(Settings(model_name="flux"), "/models/my flux") == "flux"
    with pytest.raises(ConfigurationError, match="set GCR_MODEL_NAME"):
        served_model(Settings(), "/models/my flux")


def test_a_size_is_refused_only_when_every_ready_worker_of_the_model_caps_below_it() -> None:
    capped = worker("flux", "t2i", max_pixels=1024 * 1024, defaults={"width": 1024, "height": 1024})
    big = like(capped, id="big", max_pixels=2048 * 2048)
    uncapped = like(capped, id="free", max_pixels=None)
    assert fleet.pixel_cap([capped], "flux", "t2i", 2048, 2048) == 1024 * 1024
    assert fleet.pixel_cap([capped], "flux", "t2i", 1024, 1024) is None
    assert fleet.pixel_cap([capped], "flux", "t2i", 2048, None) == 1024 * 1024, "the other side is the default"
    assert fleet.pixel_cap([capped, big], "flux", "t2i", 2048, 2048) is None
    assert fleet.pixel_cap([capped, uncapped], "flux", "t2i", 2048, 2048) is None
    assert fleet.pixel_cap([capped, like(big, state="unfit")], "flux", "t2i", 2048, 2048) == 1024 * 1024
    assert fleet.pixel_cap([SDXL], "flux", "t2i", 2048, 2048) is None
