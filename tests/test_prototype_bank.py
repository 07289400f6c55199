"""The prototype bank as one object (the distiller, a PrototypeBank): its picks, its instance
sample and its refresh iteration, written to and read from checkpoints in the layout GKD
checkpoints have always had (model buffers ``distiller.*``, hook state ``instances``)."""

import io
from types import SimpleNamespace

import torch
from conftest import REPO, setup_test_cfg
from detectron2.modeling import build_model

import gkd_d2  # noqa: F401
from gkd_d2.engine import PrototypeRefresh
from gkd_d2.modeling.prototype_bank import PrototypeBank

GKD_CFG = REPO / "tests" / "configs" / "tiny_gkd_retinanet.yaml"
BANK_KEYS = ("protos_s", "protos_t", "proto_counts", "proto_index", "bank_iter")


def test_store_picks_replaces_every_slot_and_sets_the_iteration():
    bank = PrototypeBank(2, 3, 4, 5, 6)
    bank.set_bank(1, 2, torch.ones(4, 5), torch.ones(4, 6), torch.tensor([9, 9, 9, 9]))
    feats_s = [torch.arange(50.0).reshape(10, 5) + lvl for lvl in range(2)]
    feats_t = [torch.arange(60.0).reshape(10, 6) - lvl for lvl in range(2)]
    empty = torch.zeros(0, dtype=torch.long)
    picked = [[torch.tensor([3, 1]), torch.tensor([0])], [empty, empty], [empty, torch.tensor([7])]]
    bank.store_picks(picked, feats_s, feats_t, iteration=12)
    assert int(bank.bank_iter) == 12
    assert bank.proto_counts.tolist() == [[2, 0, 0], [1, 0, 1]]
    assert bank.proto_index[0, 0].tolist() == [3, 1, -1, -1]
    assert bank.proto_index[1, 2].tolist() == [7, -1, -1, -1]  # the earlier 4 picks are gone
    assert torch.equal(bank.protos_s[1, 2, 0], feats_s[1][7])
    assert torch.equal(bank.protos_t[0, 0, :2], feats_t[0][[3, 1]])
    ps, pt, starts = bank.bank(1)
    assert starts.tolist() == [0, 1, 1, 2] and torch.equal(ps[1], feats_s[1][7])


def test_checkpoint_layout_as_before_and_an_earlier_checkpoint_resumes(tmp_path):
    """A checkpoint in the layout of gkd_d2 before the bank was one object (written out here
    key by key) loads into the model and the refresh hook: the picks, the sample and the
    iteration are the bank's, and the refresh that produced it is not run again; what the
    bank saves now has the same keys."""
    cfg = setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(tmp_path))
    model = build_model(cfg)
    d = model.distiller
    L, K, M = d.proto_index.shape
    C_S, C_T = d.protos_s.shape[-1], d.protos_t.shape[-1]
    g = torch.Generator().manual_seed(0)
    sample = {
        "image": torch.tensor([0, 0, 1, 2, 2, 3]),
        "cls": torch.tensor([0, 1, 0, 2, 2, 1]),
        "box": torch.rand(6, 4, generator=g) * 50,
    }
    counts = torch.randint(0, M + 1, (L, K), generator=g)
    index = torch.where(
        torch.arange(M)[None, None, :] < counts[:, :, None],
        torch.randint(0, 6, (L, K, M), generator=g),
        torch.tensor(-1),
    )
    earlier = {
        "model": {
            **model.state_dict(),  # the rest of the model; the bank's keys, as they were:
            "distiller.protos_s": torch.randn(L, K, M, C_S, generator=g),
            "distiller.protos_t": torch.randn(L, K, M, C_T, generator=g),
            "distiller.proto_counts": counts,
            "distiller.proto_index": index,
            "distiller.bank_iter": torch.tensor(3),
        },
        "trainer": {"iteration": 2, "hooks": {"PrototypeRefresh": {"instances": sample}}},
    }
    buffer = io.BytesIO()
    torch.save(earlier, buffer)
    buffer.seek(0)
    earlier = torch.load(buffer, weights_only=True)

    resumed = build_model(cfg)
    resumed.load_state_dict(earlier["model"], strict=True)
    hook = PrototypeRefresh(cfg, resumed)
    hook.load_state_dict(earlier["trainer"]["hooks"]["PrototypeRefresh"])
    bank = resumed.distiller
    assert bank.instances is hook.instances
    for k in sample:
        assert torch.equal(bank.instances[k], sample[k]), k
    for k in BANK_KEYS:
        assert torch.equal(getattr(bank, k), earlier["model"][f"distiller.{k}"]), k
    refreshed = []
    hook.refresh = refreshed.append
    hook.trainer = SimpleNamespace(iter=3)
    hook.before_step()  # the loaded bank is iteration 3's own
    assert refreshed == []

    # saved now: the same keys, model buffers and hook state
    state = resumed.state_dict()
    assert all(f"distiller.{k}" in state for k in BANK_KEYS)
    assert set(hook.state_dict()) == {"instances"}
    assert hook.state_dict()["instances"] is bank.instances
