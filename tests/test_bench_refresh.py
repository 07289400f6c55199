"""benchmarks/bench_refresh.py runs on the tiny config (tiny step counts): full and bank mode
side by side, the harvest's step cost, serial vs worker input, sharded vs single-process
selection, the autocast comparison (on the CPU both arms run fp32, so a known difference is put
into the autocast arm's bank: the comparison must report it). Timings are not tested beyond
being finite and positive."""

import importlib
import json
import math


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_refresh_benchmark_compares_full_and_bank_modes(tmp_path, monkeypatch):
    bench = importlib.import_module("benchmarks.bench_refresh")
    refresh = bench.timed_refresh

    def refresh_with_known_autocast_difference(hook, iteration):
        seconds = refresh(hook, iteration)
        if hook.cfg.MODEL.GKD.EXTRACT_AMP:  # the autocast arm: every teacher prototype + 0.25
            hook.student().distiller.protos_t.add_(0.25)
        return seconds

    monkeypatch.setattr(bench, "timed_refresh", refresh_with_known_autocast_difference)
    out = tmp_path / "refresh.json"
    args = [
        "--config",
        "tests/configs/tiny_gkd_retinanet.yaml",
        "--steps",
        "1",
        # one epoch of the 32 tiny images at batch 2: the harvest covers most of the sample
        "--bank-steps",
        "16",
        "--harvest-blocks",
        "2",
        "--harvest-block-steps",
        "1",
        "--worker-rounds",
        "1",
        "--selection-classes",
        "3",
        "--selection-n",
        "100",
        "--coco-projection",
        "--amp-compare",
        "--json",
        str(out),
    ]
    assert bench.main(args) == 0
    r = json.loads(out.read_text())
    # full mode, as before
    assert r["counts_as_expected"]
    images = r["distinct_sampled_images"]
    assert r["second_student_images"] == images and r["second_teacher_images"] == 0
    for key in ("first_refresh_s", "second_refresh_s", "train_step_s"):
        assert positive(r[key]), key
    # bank mode's later refresh: fewer student images than the full one, no teacher pass
    bank = r["bank"]
    assert positive(bank["first_refresh_s"]) and positive(bank["second_refresh_s"])
    assert bank["second_teacher_images"] == 0 and bank["counts_as_expected"]
    assert 0 < bank["second_student_images"] < r["second_student_images"]
    assert 0 < bank["second_harvested_share"] <= 1
    assert positive(bank["second_refresh_share_of_period"])
    assert positive(bank["harvest_call_ms_per_step"]) and 0 < bank["harvest_call_share_of_step"] < 1
    # the harvest's step cost, both arms timed
    hc = r["harvest_cost"]
    assert positive(hc["harvest_ms_per_step"]) and positive(hc["no_harvest_ms_per_step"])
    assert positive(hc["ratio"]) and len(hc["harvest_block_ms"]) == 2
    # serial vs loader workers: the same refresh, the same bank
    w = r["workers"]
    assert positive(w["serial_best_s"]) and positive(w["loader_best_s"])
    assert positive(w["loader_over_serial"]) and w["same_bank"]
    assert w["student_images"] == images
    # the selections shared out over 2 gloo processes pick what one process picks
    s = r["selection"]
    assert s["processes"] == 2 and s["identical_picks"]
    assert positive(s["single_process_s"]) and positive(s["sharded_s"])
    assert positive(s["sharded_over_single"])
    # the projection: sharded selection, the unsharded figure kept, bank bounded by the picks
    # and, flipped inputs not harvested (the default, with RANDOM_FLIP), half the sample
    p = r["coco_projection"]
    row = p["shares"][0]
    assert row["max_images_per_class"] == 800
    assert row["later_refresh_share"] < row["later_refresh_share_unsharded_selection"]
    assert p["bank_flipped_share_extracted"] == 0.5 and row["images_per_gpu"] == 8000
    assert row["bank_images_per_gpu"] == 80 * r["levels"] * 3 / 8 + 4000  # NUM_PROTOTYPES 3
    assert 0 < row["bank_later_refresh_share"] < row["later_refresh_share"]
    assert "bank_later_refresh_share_plus_harvest" in row
    # the autocast comparison reports the difference put into its second arm: the same picks,
    # prototypes 0.25 apart, and r moved
    a = r["autocast"]
    assert a["device"] == "cpu" and a["pick_overlap"]["overall"] == 1.0
    assert math.isclose(a["max_abs_prototype_difference"], 0.25, rel_tol=1e-5)
    assert a["r"]["boxes"] > 0 and a["r"]["mean_abs_delta_r"] > 0.0
    assert positive(a["autocast_refresh_s"])
