"""Ground-truth concept labels: the shapes world's per-position concepts on hand-drawn cases, and
precision / recall / F1 against an independent count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difract_ext.dashboards.labels import ShapesConcepts, f1_table, labels_from_counts
from difract_ext.dashboards.stats import SiteStats

LAYOUT = {"height": 32, "width": 32, "grid": (8, 8)}


def _patch_fractions(mask: np.ndarray) -> np.ndarray:
    """[8, 8] share of each 4×4 patch covered by ``mask`` [32, 32], by explicit loops."""
    out = np.zeros((8, 8))
    for r in range(8):
        for c in range(8):
            n = 0
            for i in range(4 * r, 4 * r + 4):
                for j in range(4 * c, 4 * c + 4):
                    n += bool(mask[i, j])
            out[r, c] = n / 16
    return out


def test_image_concepts_of_a_square_on_the_left() -> None:
    concepts = ShapesConcepts()
    names = concepts.names("img")
    present, scored = concepts.masks("a red square on the left", 0, "img", LAYOUT)
    # canonical geometry at 32 px (world.py docstring): a 12 px box centred in the left half,
    # so rows 10..21 and columns 2..13 are red
    mask = np.zeros((32, 32), bool)
    mask[10:22, 2:14] = True
    frac = _patch_fractions(mask).reshape(-1)
    for p in range(64):
        obj = frac[p] >= 0.5
        bg = frac[p] == 0
        assert scored[p] == (obj or bg), p
        assert present[p, names.index("background")] == bg, p
        for n in ("object", "colour=red", "shape=square", "position=left"):
            assert present[p, names.index(n)] == obj, (p, n)
        assert present[p].sum() == (4 if obj else int(bg))
    assert present[:, names.index("colour=blue")].sum() == 0
    # patch rows 3-4 x cols 1-2 are fully covered (4 patches); rows 2 and 5 are half covered
    # over cols 1-2 (4), cols 0 and 3 half covered over rows 3-4 (4); the corners only 1/4
    assert int((frac >= 0.5).sum()) == present[:, names.index("colour=red")].sum() == 12


def test_two_object_scene_separates_the_objects() -> None:
    concepts = ShapesConcepts()
    names = concepts.names("img")
    present, _ = concepts.masks(
        "a green circle at the top and a blue triangle at the bottom", 0, "img", LAYOUT
    )
    top = present.reshape(8, 8, -1)[:4]
    bottom = present.reshape(8, 8, -1)[4:]
    assert (
        top[..., names.index("colour=green")].any()
        and not bottom[..., names.index("colour=green")].any()
    )
    assert (
        bottom[..., names.index("shape=triangle")].any()
        and not top[..., names.index("shape=triangle")].any()
    )
    assert not (
        present[:, names.index("colour=green")] & present[:, names.index("colour=blue")]
    ).any()


def test_text_concepts_follow_the_offsets() -> None:
    concepts = ShapesConcepts()
    names = concepts.names("txt")
    prompt = "a red square on the left"
    offsets = [(0, 1), (2, 5), (6, 12), (13, 15), (16, 19), (20, 24), (0, 0), (0, 0)]
    present, scored = concepts.masks(prompt, 0, "txt", {**LAYOUT, "offsets": offsets})
    assert scored.all()
    words = ["a", "red", "square", "on", "the", "left"]
    for p, w in enumerate(words):
        assert present[p].sum() == 1 and present[p, names.index(f"word={w}")]
    assert not present[6:].any()  # </s> and padding hold no word


def test_precision_recall_f1_against_an_independent_count() -> None:
    rng = np.random.default_rng(0)
    n_ex, n_pos, n_feat, n_conc, steps = 5, 7, 6, 4, 2
    names = [f"c{i}" for i in range(n_conc)]
    stats = SiteStats(n_feat, steps, 2, n_pos, 3, n_conc)
    all_acts, all_conc, all_scored = [], [], []
    ids = torch.full((n_ex, n_pos), -1)
    for s in range(steps):
        acts = torch.from_numpy(np.maximum(rng.normal(size=(n_ex, n_pos, n_feat)), 0)).float()
        acts[..., 0] = 0  # a feature that never fires: no label
        conc = torch.from_numpy(rng.random((n_ex, n_pos, n_conc)) < 0.4)
        scored = torch.from_numpy(rng.random((n_ex, n_pos)) < 0.8)
        # feature 1 fires exactly where concept 2 is present (F1 = 1 on scored positions)
        acts[..., 1] = conc[..., 2].float() * 2.0
        stats.add_counts(s, ids, "img", n_pos, conc, scored)
        stats.add_block(s, 0, acts[..., :4], torch.arange(n_ex), ids, "img", conc, scored)
        stats.add_block(s, 4, acts[..., 4:], torch.arange(n_ex), ids, "img", conc, scored)
        all_acts.append(acts), all_conc.append(conc), all_scored.append(scored)
    labels = labels_from_counts(stats, names)
    assert 0 not in labels
    assert labels[1] == {"label": "c2", "f1": 1.0, "precision": 1.0, "recall": 1.0}
    for f in range(1, n_feat):
        best = None
        for c in range(n_conc):
            tp = fired = present = 0
            for acts, conc, scored in zip(all_acts, all_conc, all_scored):
                for e in range(n_ex):
                    for p in range(n_pos):
                        if not scored[e, p]:
                            continue
                        fire = acts[e, p, f] > 0
                        fired += int(fire)
                        present += int(conc[e, p, c])
                        tp += int(fire and conc[e, p, c])
            f1 = 2 * tp / (fired + present)
            if best is None or f1 > best[0]:
                best = (f1, c, tp / fired, tp / present)
        assert labels[f]["label"] == names[best[1]]
        assert labels[f]["f1"] == pytest.approx(best[0], abs=1e-6)
        assert labels[f]["precision"] == pytest.approx(best[2], abs=1e-6)
        assert labels[f]["recall"] == pytest.approx(best[3], abs=1e-6)
    table = f1_table(stats, names)
    assert table["best"]["c2"] == {"f1": 1.0, "feature": 1}
    assert table["best_step"]["c2"] == {"f1": 1.0, "feature": 1, "step": 0}
    # per-step F1 of concept 0, by loops over one step's positions only
    best0 = 0.0
    for f in range(n_feat):
        for acts, conc, scored in zip(all_acts, all_conc, all_scored):
            keep = scored.numpy()
            fire = acts[..., f].numpy()[keep] > 0
            here = conc[..., 0].numpy()[keep]
            if fire.sum() + here.sum():
                best0 = max(best0, 2 * (fire & here).sum() / (fire.sum() + here.sum()))
    assert table["best_step"]["c0"]["f1"] == pytest.approx(best0, abs=1e-4)
    assert table["n_features_f1_ge_0.9"] == sum(v["f1"] >= 0.9 for v in labels.values())
