"""Selection policies (gradsel_core.selection) and the ``gradsel select`` command."""
from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsel_core.selection import POLICIES, Selection, keep_mask, policy_names, register_policy, select, target_count


def ids_of(sel: Selection):
    return sel.kept_ids.tolist()


# The paper's rule, step by step, on a hand-made batch of B = 10.
#   losses: eight 3's, one 1 and one 5 -> mean 3, population std sqrt(0.8) ≈ 0.894
#   -> samples 8 and 9 (|loss-3| = 2 > 0.894) fail the loss filter although their norms (2.3, 2.4)
#      are the closest to the batch median.
#   survivors 0..7, norms sorted: 0.5 1 2 2.2 | 2.5 3 4 10 -> median (2.2+2.5)/2 = 2.35
#   distances: 0:1.85 1:1.35 2:0.35 3:0.65 4:1.65 5:7.65 6:0.15 7:0.15
PAPER = {
    "norms": [0.5, 1.0, 2.0, 3.0, 4.0, 10.0, 2.5, 2.2, 2.3, 2.4],
    "losses": [3.0] * 8 + [1.0, 5.0],
}


class TestMedianBand:
    def test_paper_rule_step_by_step(self):
        sel = select(PAPER, policy="median_band", ratio=0.2, loss_filter_std=1.0)
        s = sel.summary
        # step 1: loss filter
        assert s["loss_mean"] == pytest.approx(3.0)
        assert s["loss_std"] == pytest.approx(math.sqrt(0.8))
        assert (s["loss_low"], s["loss_high"]) == pytest.approx((3 - math.sqrt(0.8), 3 + math.sqrt(0.8)))
        assert s["loss_filtered"] == 2 and s["survivors"] == 8
        # step 2: median of the survivors' norms
        assert s["median"] == pytest.approx(2.35)
        # step 3: keep floor(0.2 * 10) = 2 closest to the median
        assert s["target"] == 2
        assert ids_of(sel) == [6, 7]
        assert sel.dropped_ids.tolist() == [0, 1, 2, 3, 4, 5, 8, 9]
        assert (s["n"], s["kept"], s["dropped"]) == (10, 2, 8)
        assert s["max_kept_distance"] == pytest.approx(0.15)
        assert (s["kept_key_min"], s["kept_key_max"]) == (2.2, 2.5)
        assert sel.kept_mask.tolist() == [False] * 6 + [True, True, False, False]

    @pytest.mark.parametrize("ratio,kept", [(0.3, [2, 6, 7]), (0.4, [2, 3, 6, 7]), (0.6, [1, 2, 3, 4, 6, 7])])
    def test_paper_rule_larger_ratios(self, ratio, kept):
        assert ids_of(select(PAPER, ratio=ratio)) == kept

    def test_count_uses_batch_size_capped_at_survivors(self):
        sel = select(PAPER, ratio=1.0)  # floor(1.0 * 10) = 10 > 8 survivors -> all survivors
        assert ids_of(sel) == list(range(8))
        assert sel.summary["target"] == 10 and sel.summary["kept"] == 8

    def test_without_loss_filter(self):
        # all 10 norms: median (2.3+2.4)/2 = 2.35; 8 and 9 are 0.05 away
        sel = select(PAPER, ratio=0.2, loss_filter_std=None)
        assert ids_of(sel) == [8, 9]
        assert sel.summary["loss_filtered"] == 0 and math.isnan(sel.summary["loss_mean"])

    def test_loss_filter_is_inclusive(self):
        # losses 1, 3: mean 2, std 1 -> both exactly one std away, both survive
        sel = select({"norms": [1.0, 2.0], "losses": [1.0, 3.0]}, ratio=1.0)
        assert ids_of(sel) == [0, 1]

    def test_loss_filter_zero_std_width(self):
        sel = select({"norms": [1.0, 2.0, 3.0], "losses": [1.0, 2.0, 3.0]}, ratio=1.0, loss_filter_std=0.0)
        assert ids_of(sel) == [1]


NORMS5 = {"norms": [5.0, 1.0, 4.0, 2.0, 3.0], "losses": [1.0] * 5}


class TestOtherPolicies:
    def test_registry(self):
        assert set(policy_names()) >= {"median_band", "drop_top", "keep_bottom", "keep_top", "band", "threshold", "random"}

    def test_keep_bottom(self):
        assert ids_of(select(NORMS5, policy="keep_bottom", ratio=0.4)) == [1, 3]

    def test_keep_top(self):
        assert ids_of(select(NORMS5, policy="keep_top", ratio=0.4)) == [0, 2]

    def test_drop_top(self):
        sel = select(NORMS5, policy="drop_top", ratio=0.4)
        assert ids_of(sel) == [1, 3, 4]
        assert sel.summary["target_dropped"] == 2

    def test_drop_top_rounds_dropped_count_down(self):
        # floor(0.3 * 5) = 1 dropped -> 4 kept
        assert ids_of(select(NORMS5, policy="drop_top", ratio=0.3)) == [1, 2, 3, 4]

    def test_band(self):
        # sorted norms 1..5: q0.25 = 2, q0.75 = 4 -> keep norms 2, 3, 4
        sel = select(NORMS5, policy="band", low_q=0.25, high_q=0.75)
        assert ids_of(sel) == [2, 3, 4]
        assert (sel.summary["band_low"], sel.summary["band_high"]) == (2.0, 4.0)

    def test_band_interpolates(self):
        # q0.1 of 1..5 = 1.4, q0.6 = 3.4 -> keep 2, 3
        assert ids_of(select(NORMS5, policy="band", low_q=0.1, high_q=0.6)) == [3, 4]

    def test_threshold(self):
        assert ids_of(select(NORMS5, policy="threshold", max_norm=3.0)) == [1, 3, 4]
        assert ids_of(select(NORMS5, policy="threshold", max_norm=0.5)) == []

    def test_random_is_seeded_and_counts_like_median_band(self):
        a = select(NORMS5, policy="random", ratio=0.4, seed=3)
        b = select(NORMS5, policy="random", ratio=0.4, seed=3)
        assert ids_of(a) == ids_of(b) and len(a) == 2
        assert len(a) == len(select(NORMS5, policy="median_band", ratio=0.4))
        seen = {tuple(ids_of(select(NORMS5, policy="random", ratio=0.4, seed=s))) for s in range(20)}
        assert len(seen) > 1

    def test_explicit_loss_filter_applies_to_every_policy(self):
        data = {"norms": [5.0, 1.0, 4.0, 2.0, 3.0, 9.0], "losses": [1.0] * 5 + [50.0]}
        assert ids_of(select(data, policy="keep_top", ratio=0.34, loss_filter_std=1.0)) == [0, 2]  # 9.0 filtered
        assert ids_of(select(data, policy="keep_top", ratio=0.34, loss_filter_std=None)) == [0, 5]
        assert ids_of(select(data, policy="keep_top", ratio=0.34)) == [0, 5]  # default: no filter for keep_top

    def test_custom_policy_registration(self):
        @register_policy("_test_even_positions")
        def _even(key, *, n, ratio, rng):
            return np.arange(key.size) % 2 == 0, {"note": "even"}

        try:
            sel = select(NORMS5, policy="_test_even_positions")
            assert ids_of(sel) == [0, 2, 4] and sel.summary["note"] == "even"
        finally:
            POLICIES.pop("_test_even_positions")


class TestLossFilterDefault:
    """Issue 17 part 1: the loss pre-filter is median_band's step 1, not a default of every policy."""

    DATA = {"norms": np.random.default_rng(0).random(1000), "losses": np.random.default_rng(1).normal(size=1000)}

    @pytest.mark.parametrize("policy,kept", [("drop_top", 800), ("keep_top", 200), ("keep_bottom", 200),
                                             ("random", 200)])
    def test_other_policies_default_to_no_filter(self, policy, kept):
        sel = select(self.DATA, policy=policy, ratio=0.2)
        assert len(sel) == kept and sel.summary["loss_filtered"] == 0
        assert sel.summary["loss_filter_std"] is None

    def test_median_band_defaults_to_one_std(self):
        sel = select(self.DATA, policy="median_band", ratio=0.2)
        assert sel.summary["loss_filter_std"] == 1.0 and sel.summary["loss_filtered"] > 250
        assert ids_of(sel) == ids_of(select(self.DATA, policy="median_band", ratio=0.2, loss_filter_std=1.0))
        assert select(self.DATA, ratio=0.2, loss_filter_std=None).summary["loss_filter_std"] is None

    def test_explicit_value_for_any_policy_is_recorded(self):
        sel = select(self.DATA, policy="drop_top", ratio=0.2, loss_filter_std=1.0)
        assert sel.summary["loss_filter_std"] == 1.0 and sel.summary["loss_filtered"] > 250 and len(sel) < 800
        assert select(self.DATA, policy="drop_top", ratio=0.2, loss_filter_std="auto").summary["loss_filter_std"] is None

    def test_keep_mask_drop_top_on_eight(self):
        m, s = keep_mask(torch.arange(8.0), torch.tensor([0.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
                         policy="drop_top", ratio=0.25, return_summary=True)
        assert int(m.sum()) == 6 and m[:6].all() and s["loss_filter_std"] is None

    def test_filtered_backward_drop_top_on_eight(self):
        import gradsel_core as gs
        from conftest import lm_batch, tiny_gpt

        model = tiny_gpt().eval()
        res = gs.filtered_backward(model, lm_batch(B=8, padding=False), policy="drop_top", ratio=0.25)
        assert res.n_kept == 6 and res.summary["loss_filter_std"] is None
        fb = gs.FilteredBackward(model, policy="median_band", ratio=0.5)
        assert fb.loss_filter_std == 1.0
        assert gs.FilteredBackward(model, policy="keep_top", loss_filter_std=0.5).loss_filter_std == 0.5

    def test_selection_config(self):
        from gradsel_core.selection import SelectionConfig

        assert SelectionConfig("drop_top").resolved_loss_filter_std is None
        assert SelectionConfig("median_band").resolved_loss_filter_std == 1.0
        assert SelectionConfig("random", loss_filter_std=1.0).resolved_loss_filter_std == 1.0
        assert SelectionConfig.coerce({"policy": "keep_top"}).to_dict()["loss_filter_std"] == "auto"
        for bad in ("often", -1.0, float("inf")):
            with pytest.raises(ValueError, match="loss_filter_std"):
                SelectionConfig("random", loss_filter_std=bad)


class TestCounting:
    """Issue 11 item 2: ratios count as a user means them; a training batch keeps at least one."""

    def test_target_count_tolerates_float_representation(self):
        assert target_count(1 / 3, 3) == 1 and target_count(1 / 3, 300) == 100 and target_count(2 / 3, 3) == 2
        assert target_count(0.1 * 3, 10) == 3  # 0.30000000000000004
        assert target_count(0.29, 100) == 29 and target_count(0.2999, 10) == 2  # a real fraction still floors
        assert target_count(0.1, 3) == 0 and target_count(0.1, 3, per_batch=True) == 1
        assert target_count(0.0, 3, per_batch=True) == 0 and target_count(0.5, 0, per_batch=True) == 0

    def test_select_third(self):
        d = {"norms": np.arange(300.0), "losses": np.ones(300)}
        assert len(select(d, policy="keep_top", ratio=1 / 3)) == 100
        assert len(select({"norms": [1.0, 2.0, 3.0], "losses": [1.0] * 3}, policy="keep_top", ratio=1 / 3)) == 1

    @pytest.mark.parametrize("policy", ["median_band", "keep_top", "keep_bottom", "random"])
    def test_per_batch_keeps_at_least_one(self, policy):
        norms, losses = torch.tensor([1.0, 2.0, 3.0]), torch.ones(3)
        assert int(keep_mask(norms, losses, policy=policy, ratio=0.1).sum()) == 1
        assert int(keep_mask(norms, losses, policy=policy, ratio=0.0).sum()) == 0
        assert len(select({"norms": norms, "losses": losses}, policy=policy, ratio=0.1)) == 0  # offline: ⌊0.3⌋

    def test_filtered_backward_third_of_three_applies_a_gradient(self):
        import gradsel_core as gs
        from conftest import lm_batch, tiny_gpt

        model = tiny_gpt().eval()
        res = gs.filtered_backward(model, lm_batch(B=3, padding=False), policy="median_band", ratio=1 / 3)
        assert res.n_kept == 1
        assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) > 0


class TestTies:
    def test_equal_norms_earlier_position_wins(self):
        d = {"norms": [1.0] * 4, "losses": [0.0] * 4}
        assert ids_of(select(d, policy="keep_bottom", ratio=0.5)) == [0, 1]
        assert ids_of(select(d, policy="keep_top", ratio=0.5)) == [0, 1]
        assert ids_of(select(d, policy="drop_top", ratio=0.5)) == [0, 1]
        assert ids_of(select(d, policy="median_band", ratio=0.5)) == [0, 1]

    def test_median_distance_tie_uses_position_not_id(self):
        # median 1.5; positions 1 and 2 are both 0.5 away -> position 1 (id "c") wins
        d = {"norms": [0.0, 2.0, 1.0, 3.0], "losses": [0.0] * 4, "ids": ["d", "c", "b", "a"]}
        sel = select(d, ratio=0.25)
        assert ids_of(sel) == ["c"]
        assert sel.dropped_ids.tolist() == ["a", "b", "d"]
        assert sel.kept_mask.tolist() == [False, True, False, False]

    def test_band_keeps_ties_together(self):
        d = {"norms": [1.0, 2.0, 2.0, 2.0, 3.0], "losses": [0.0] * 5}
        assert ids_of(select(d, policy="band", low_q=0.5, high_q=0.5)) == [1, 2, 3]


class TestNonFinite:
    def test_nan_and_inf_never_kept(self):
        d = {
            "norms": [1.0, np.nan, 2.0, np.inf, 3.0, 4.0],
            "losses": [1.0, 1.0, np.nan, 1.0, 1.0, -np.inf],
        }
        for policy, kw in [("median_band", {}), ("keep_top", {}), ("keep_bottom", {}), ("drop_top", {}), ("random", {}),
                           ("band", {"low_q": 0.0, "high_q": 1.0}), ("threshold", {"max_norm": np.inf})]:
            sel = select(d, policy=policy, ratio=1.0, **kw)
            assert set(ids_of(sel)) <= {0, 4}, policy
            assert sel.summary["nonfinite"] == 4
        sel = select(d, ratio=1.0)
        assert ids_of(sel) == [0, 4] and sel.summary["loss_mean"] == 1.0 and sel.summary["loss_std"] == 0.0

    def test_drop_top_does_not_count_nan_as_dropped_top(self):
        d = {"norms": [1.0, 2.0, 3.0, 4.0, np.nan], "losses": [0.0] * 5}
        # floor(0.2 * 5) = 1 highest finite norm dropped, plus the NaN
        assert ids_of(select(d, policy="drop_top", ratio=0.2)) == [0, 1, 2]

    def test_all_invalid(self):
        sel = select({"norms": [np.nan, np.nan], "losses": [1.0, 2.0]}, ratio=1.0)
        assert ids_of(sel) == [] and sel.summary["nonfinite"] == 2 and math.isnan(sel.summary["median"])


class TestEdgeCases:
    def test_empty(self):
        for policy, kw in [("median_band", {}), ("keep_top", {}), ("band", {"low_q": 0.1, "high_q": 0.9}), ("random", {})]:
            sel = select({"norms": [], "losses": []}, policy=policy, **kw)
            assert sel.kept_ids.size == 0 and sel.dropped_ids.size == 0 and sel.summary["n"] == 0
        m = keep_mask(torch.zeros(0), torch.zeros(0))
        assert m.dtype == torch.bool and m.shape == (0,)

    def test_single(self):
        d = {"norms": [2.0], "losses": [1.0]}
        assert ids_of(select(d, ratio=1.0)) == [0]
        assert ids_of(select(d, ratio=0.5)) == []  # floor(0.5) = 0
        assert keep_mask(torch.tensor([2.0]), torch.tensor([1.0]), ratio=1.0).tolist() == [True]

    def test_ratio_zero_and_one(self):
        d = {"norms": np.arange(7.0), "losses": np.ones(7)}
        for policy in ("median_band", "keep_top", "keep_bottom", "random"):
            assert ids_of(select(d, policy=policy, ratio=0.0)) == []
            assert ids_of(select(d, policy=policy, ratio=1.0)) == list(range(7))
        assert ids_of(select(d, policy="drop_top", ratio=0.0)) == list(range(7))
        assert ids_of(select(d, policy="drop_top", ratio=1.0)) == []

    def test_equal_losses_all_pass(self):
        # 0.1 is not exact in binary; the mean of 7 copies can differ from 0.1 by rounding
        d = {"norms": np.arange(7.0), "losses": np.full(7, 0.1, dtype=np.float32)}
        sel = select(d, ratio=1.0)
        assert sel.summary["loss_filtered"] == 0 and len(sel) == 7
        d = {"norms": np.arange(7.0), "losses": [1 / 3] * 7}
        assert len(select(d, ratio=1.0)) == 7

    def test_target_count_exact(self):
        assert target_count(0.2, 10) == 2
        assert target_count(0.29, 100) == 29  # float math gives 28.999999999999996
        assert target_count(0.25, 10) == 2
        assert target_count(0.7, 10) == 7
        assert target_count(1.0, 7) == 7 and target_count(0.0, 7) == 0 and target_count(0.5, 0) == 0


class TestValidation:
    @pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "abc"])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match="ratio"):
            select(NORMS5, ratio=ratio)
        with pytest.raises(ValueError, match="ratio"):
            keep_mask(torch.ones(3), torch.ones(3), ratio=ratio)

    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="length"):
            select({"norms": [1.0, 2.0], "losses": [1.0]})
        with pytest.raises(ValueError, match="length"):
            select({"norms": [1.0, 2.0], "losses": [1.0, 1.0], "tokens": [3]})
        with pytest.raises(ValueError, match="length"):
            select({"norms": [1.0, 2.0], "losses": [1.0, 1.0], "ids": [7]})
        with pytest.raises(ValueError, match="length"):
            keep_mask(torch.ones(3), torch.ones(2))
        with pytest.raises(ValueError, match="length"):
            select({"norms": [1.0, 2.0], "losses": [1.0, 1.0]}, group_by=["a"])

    def test_duplicate_ids(self):
        with pytest.raises(ValueError, match="unique"):
            select({"norms": [1.0, 2.0, 3.0], "losses": [1.0] * 3, "ids": ["a", "b", "a"]})

    def test_unknown_policy_lists_names(self):
        with pytest.raises(ValueError, match="median_band.*") as e:
            select(NORMS5, policy="nope")
        assert "keep_top" in str(e.value) and "nope" in str(e.value)

    def test_policy_parameters(self):
        with pytest.raises(ValueError, match="low_q"):
            select(NORMS5, policy="band")
        with pytest.raises(ValueError, match="max_norm"):
            select(NORMS5, policy="threshold")
        with pytest.raises(ValueError, match="does not take"):
            select(NORMS5, policy="median_band", low_q=0.1)
        with pytest.raises(ValueError, match="low_q <= high_q"):
            select(NORMS5, policy="band", low_q=0.8, high_q=0.2)

    def test_misc(self):
        with pytest.raises(ValueError, match="loss_filter_std"):
            select(NORMS5, loss_filter_std=-1)
        with pytest.raises(ValueError, match="tokens"):
            select(NORMS5, length_normalize=True)
        with pytest.raises(ValueError, match="length_normalize"):
            select({**NORMS5, "tokens": [1] * 5}, length_normalize="cube")
        with pytest.raises(ValueError, match="norms"):
            select({"losses": [1.0]})
        with pytest.raises(ValueError, match="1-D"):
            select({"norms": [[1.0]], "losses": [[1.0]]})


class TestGroups:
    DATA = {
        "norms": [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0],
        "losses": [1.0] * 8,
        "task": ["a", "b"] * 4,
        "ids": [10, 11, 12, 13, 14, 15, 16, 17],
    }

    def test_group_by_key(self):
        # a: norms 1,2,3,4 (ids 10,12,14,16), median 2.5 -> closest two: 2, 3 (ids 12, 14)
        # b: norms 10..40 (ids 11,13,15,17), median 25 -> 20, 30 (ids 13, 15)
        sel = select(self.DATA, ratio=0.5, group_by="task")
        assert ids_of(sel) == [12, 13, 14, 15]
        s = sel.summary
        assert s["group_by"] == "task" and s["n_groups"] == 2
        assert s["groups"]["a"]["median"] == 2.5 and s["groups"]["b"]["median"] == 25.0
        assert s["groups"]["a"]["kept"] == 2 and s["kept"] == 4 and s["n"] == 8 and s["target"] == 4
        # globally instead: median 7 -> 4 (id 16), 3 (id 14), 10 (id 11), 2 (id 12)
        assert ids_of(select(self.DATA, ratio=0.5)) == [11, 12, 14, 16]

    def test_group_by_array_and_fields(self):
        labels = np.array(self.DATA["task"])
        a = select(self.DATA, ratio=0.5, group_by=labels)
        store = SimpleNamespace(ids=np.array(self.DATA["ids"]), norms=np.array(self.DATA["norms"]),
                                losses=np.array(self.DATA["losses"]), tokens=None, meta={},
                                fields={"task": labels})
        b = select(store, ratio=0.5, group_by="task")
        assert ids_of(a) == ids_of(b) == [12, 13, 14, 15]
        with pytest.raises(ValueError, match="available fields: task"):
            select(store, group_by="source")

    def test_group_keep_top_per_group(self):
        assert ids_of(select(self.DATA, policy="keep_top", ratio=0.25, group_by="task")) == [16, 17]

    def test_group_loss_filter_is_per_group(self):
        d = {"norms": np.arange(8.0), "losses": [0.0, 0.0] + [100.0] * 6, "g": [0, 0] + [1] * 6}
        # globally: mean 75, std sqrt(1875) ≈ 43.3 -> the two 0-losses are filtered (|0-75| = 75);
        # per group every loss equals its group's mean (std 0) -> all pass
        assert ids_of(select(d, policy="keep_bottom", ratio=1.0, loss_filter_std=1.0)) == [2, 3, 4, 5, 6, 7]
        assert ids_of(select(d, policy="keep_bottom", ratio=1.0, group_by="g", loss_filter_std=1.0)) == list(range(8))

    def test_missing_labels_form_one_group(self):
        d = {"norms": [1.0, 2.0, 3.0, 4.0], "losses": [0.0] * 4, "g": [np.nan, 1.0, np.nan, 1.0]}
        s = select(d, policy="keep_top", ratio=0.5, group_by="g")
        assert ids_of(s) == [2, 3] and set(s.summary["groups"]) == {"None", "1.0"}

    def test_string_and_int_labels_do_not_collide(self):
        d = {"norms": [1.0, 2.0, 3.0, 4.0], "losses": [0.0] * 4, "g": ["1", 1, "1", 1]}
        s = select(d, policy="keep_top", ratio=0.5, group_by="g").summary
        assert s["n_groups"] == 2 and set(s["groups"]) == {"str:1", "int:1"}
        assert s["groups"]["str:1"]["label"] == "1" and s["groups"]["int:1"]["label"] == 1
        assert s["groups"]["str:1"]["n"] == 2 and s["groups"]["int:1"]["n"] == 2 and s["kept"] == 2
        obj = np.array(["1", 1, "1", 1], dtype=object)
        assert set(select(d, ratio=0.5, group_by=obj).summary["groups"]) == {"str:1", "int:1"}
        # labels that print differently keep their plain keys
        assert set(select(d, ratio=0.5, group_by=["a", 1, "a", 1]).summary["groups"]) == {"a", "1"}

    def test_group_random_deterministic(self):
        a = select(self.DATA, policy="random", ratio=0.5, group_by="task", seed=1)
        b = select(self.DATA, policy="random", ratio=0.5, group_by="task", seed=1)
        assert ids_of(a) == ids_of(b) and a.summary["groups"]["a"]["kept"] == 2


class TestInputsAndLength:
    def test_score_result_like_torch_input(self):
        from gradsel_core.types import ScoreResult

        res = ScoreResult(norms=torch.tensor(PAPER["norms"]), losses=torch.tensor(PAPER["losses"]),
                          tokens=torch.arange(1, 11))
        sel = select(res, ratio=0.2, diagnostics=True)
        assert ids_of(sel) == [6, 7] and sel.kept_ids.dtype.kind == "i"
        assert "mean_tokens_kept" not in select(res, ratio=0.2).summary  # diagnostics only on request
        assert sel.summary["mean_tokens_kept"] == 7.5 and sel.summary["mean_tokens_dropped"] == 5.0

    def test_bfloat16_and_string_ids(self):
        d = {"norms": torch.tensor([3.0, 1.0, 2.0], dtype=torch.bfloat16), "losses": torch.ones(3),
             "ids": ["z", "x", "y"]}
        sel = select(d, policy="keep_bottom", ratio=0.67)
        assert ids_of(sel) == ["x", "y"] and sel.dropped_ids.tolist() == ["z"]

    def test_length_correlations(self):
        tokens = np.array([50, 40, 30, 20, 10])
        d = {"norms": [1.0, 2.0, 3.0, 5.0, 9.0], "losses": [1.0] * 5, "tokens": tokens}
        s = select(d, policy="keep_top", ratio=0.4, diagnostics=True).summary
        assert s["norm_tokens_spearman"] == pytest.approx(-1.0)
        assert s["norm_tokens_pearson"] == pytest.approx(np.corrcoef(d["norms"], tokens)[0, 1])
        assert s["mean_tokens_kept"] == 15.0 and s["mean_tokens_dropped"] == 40.0
        assert "norm_tokens_pearson" not in select(NORMS5, diagnostics=True).summary

    def test_spearman_with_ties(self):
        d = {"norms": [1.0, 1.0, 2.0, 3.0], "losses": [1.0] * 4, "tokens": [1, 2, 2, 3]}
        # average ranks: norms 1.5 1.5 3 4, tokens 1 2.5 2.5 4
        r = np.corrcoef([1.5, 1.5, 3, 4], [1, 2.5, 2.5, 4])[0, 1]
        assert select(d, diagnostics=True).summary["norm_tokens_spearman"] == pytest.approx(r)

    def test_length_normalize(self):
        # norm / tokens: 1.0, 1.0, 0.5, 2.0 -> keep_bottom 1 keeps id 2; raw norms would keep id 0
        d = {"norms": [2.0, 4.0, 4.0, 2.0], "losses": [1.0] * 4, "tokens": [2, 4, 8, 1]}
        assert ids_of(select(d, policy="keep_bottom", ratio=0.25)) == [0]
        s = select(d, policy="keep_bottom", ratio=0.25, length_normalize=True, diagnostics=True)
        assert ids_of(s) == [2] and s.summary["length_normalize"] == "tokens" and "key_tokens_spearman" in s.summary
        # norm / sqrt(tokens): 1.414, 2, 1.414, 2 -> ids 0 then 2 (tie, position)
        assert ids_of(select(d, policy="keep_bottom", ratio=0.25, length_normalize="sqrt")) == [0]
        assert ids_of(select(d, policy="keep_bottom", ratio=0.5, length_normalize="sqrt")) == [0, 2]
        # threshold applies to the key
        assert ids_of(select(d, policy="threshold", max_norm=1.0, length_normalize="tokens")) == [0, 1, 2]

    def test_length_normalize_zero_tokens(self):
        d = {"norms": [0.0, 3.0, 1.0], "losses": [0.0, 1.0, 1.0], "tokens": [0, 3, 4]}
        sel = select(d, policy="keep_bottom", ratio=1.0, loss_filter_std=None, length_normalize=True)
        assert ids_of(sel) == [0, 1, 2] and sel.summary["nonfinite"] == 0


class TestKeepMask:
    @pytest.mark.parametrize("policy,kw", [("median_band", {}), ("keep_top", {}), ("keep_bottom", {}), ("drop_top", {}),
                                           ("random", {}), ("band", {"low_q": 0.2, "high_q": 0.7}),
                                           ("threshold", {"max_norm": 0.5})])
    def test_equals_select(self, policy, kw):
        g = torch.Generator().manual_seed(0)
        norms, losses = torch.rand(37, generator=g), torch.randn(37, generator=g)
        tokens = torch.randint(0, 30, (37,), generator=g)
        norms[5] = float("nan")
        for lfs in (1.0, None):
            for ln in (False, "sqrt"):
                m = keep_mask(norms, losses, policy=policy, ratio=0.3, loss_filter_std=lfs, tokens=tokens, seed=4,
                              length_normalize=ln, **kw)
                sel = select({"norms": norms, "losses": losses, "tokens": tokens}, policy=policy, ratio=0.3,
                             loss_filter_std=lfs, seed=4, length_normalize=ln, **kw)
                assert isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.device == norms.device
                assert m.numpy().tolist() == sel.kept_mask.tolist()
                assert not m[5]

    def test_paper_batch_and_summary(self):
        m, s = keep_mask(torch.tensor(PAPER["norms"]), torch.tensor(PAPER["losses"]), return_summary=True)
        assert m.nonzero().flatten().tolist() == [6, 7] and s["median"] == pytest.approx(2.35)

    def test_generator_seed_advances(self):
        rng = np.random.default_rng(0)
        masks = {tuple(keep_mask(torch.rand(20), torch.ones(20), policy="random", ratio=0.5, seed=rng).tolist())
                 for _ in range(5)}
        assert len(masks) > 1  # a shared Generator gives a fresh draw per step; a fixed int seed would not

    def test_numpy_input(self):
        m = keep_mask(np.arange(5.0), np.ones(5), ratio=0.4)
        assert m.tolist() == [False, True, True, False, False]  # median 2; tie 1 vs 3 -> position 1


# ---------------------------------------------------------------------------------------------
# properties

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
norm_vals = st.one_of(st.floats(min_value=0, max_value=1e3, allow_nan=False), st.sampled_from([0.0, 1.0, 2.0]))


@st.composite
def batches(draw, allow_nan=False):
    n = draw(st.integers(0, 40))
    elem = st.one_of(norm_vals, st.just(float("nan"))) if allow_nan else norm_vals
    norms = draw(st.lists(elem, min_size=n, max_size=n))
    losses = draw(st.lists(st.one_of(finite, st.sampled_from([1.0, 2.0])), min_size=n, max_size=n))
    ratio = draw(st.floats(0, 1))
    return np.array(norms, dtype=np.float64), np.array(losses, dtype=np.float64), ratio


PROP = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROP
@given(batches(allow_nan=True), st.sampled_from([1.0, 0.5, None]),
       st.sampled_from(["median_band", "keep_top", "keep_bottom", "drop_top", "random"]))
def test_partition_and_sorted(batch, lfs, policy):
    norms, losses, ratio = batch
    n = norms.size
    ids = np.random.default_rng(0).permutation(n) * 3 + 100
    sel = select({"norms": norms, "losses": losses, "ids": ids}, policy=policy, ratio=ratio, loss_filter_std=lfs)
    kept, dropped = sel.kept_ids.tolist(), sel.dropped_ids.tolist()
    assert sorted(kept + dropped) == sorted(ids.tolist()) and not set(kept) & set(dropped)
    assert kept == sorted(kept) and dropped == sorted(dropped)
    assert sel.kept_mask.shape == (n,) and sel.kept_mask.sum() == len(kept) == sel.summary["kept"]
    assert set(ids[sel.kept_mask].tolist()) == set(kept)
    assert not np.any(sel.kept_mask & ~np.isfinite(norms))


@PROP
@given(batches(allow_nan=True), st.sampled_from([1.0, 2.0, None]))
def test_median_band_count_and_optimality(batch, lfs):
    norms, losses, ratio = batch
    n = norms.size
    sel = select({"norms": norms, "losses": losses}, ratio=ratio, loss_filter_std=lfs)
    s = sel.summary
    surv_count = s["survivors"]
    target = target_count(ratio, n)
    assert s["kept"] == min(target, surv_count)
    if surv_count >= target:
        assert s["kept"] == target

    # recompute the survivors independently
    valid = np.isfinite(norms) & np.isfinite(losses)
    if lfs is None or not valid.any():
        surv = valid
    else:
        mu, sd = losses[valid].mean(), losses[valid].std()
        surv = valid & (np.abs(losses - mu) <= lfs * sd + 1e-9 * (abs(mu) + sd))
    assert surv.sum() == surv_count
    assert not np.any(sel.kept_mask & ~surv)
    if surv.any():
        med = np.median(norms[surv])
        assert s["median"] == pytest.approx(med)
        dist = np.abs(norms - med)
        kept_d, other_d = dist[sel.kept_mask], dist[surv & ~sel.kept_mask]
        if kept_d.size and other_d.size:
            assert kept_d.max() <= other_d.min()


@PROP
@given(batches(), st.sampled_from(["keep_top", "keep_bottom", "drop_top"]))
def test_rank_policies_are_extremal(batch, policy):
    norms, losses, ratio = batch
    sel = select({"norms": norms, "losses": losses}, policy=policy, ratio=ratio, loss_filter_std=None)
    kept, other = norms[sel.kept_mask], norms[~sel.kept_mask]
    k = target_count(ratio, norms.size)
    assert kept.size == (norms.size - k if policy == "drop_top" else k)
    if kept.size and other.size:
        if policy == "keep_top":
            assert kept.min() >= other.max()
        else:
            assert kept.max() <= other.min()


@PROP
@given(batches(allow_nan=True), st.sampled_from(["median_band", "random", "keep_top"]), st.integers(0, 3))
def test_keep_mask_matches_select(batch, policy, seed):
    norms, losses, ratio = batch
    m = keep_mask(torch.from_numpy(norms).float(), torch.from_numpy(losses), policy=policy, ratio=ratio, seed=seed)
    n = norms.size
    # per batch a positive ratio keeps at least one: the same as select at ratio 1/n (⌊(1/n)·n⌋ = 1)
    r = ratio if (target_count(ratio, n) >= 1 or ratio == 0 or n == 0) else 1 / n
    sel = select({"norms": norms.astype(np.float32), "losses": losses}, policy=policy, ratio=r, seed=seed)
    assert m.tolist() == sel.kept_mask.tolist()


# ---------------------------------------------------------------------------------------------
# CLI command


def _parse(argv):
    from gradsel_core.commands import select as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    return p.parse_args(argv)


class FakeStore:
    def __init__(self, with_fields=True):
        self.ids = np.array(["s%02d" % i for i in range(10)][::-1])
        self.norms = np.array(PAPER["norms"], dtype=np.float32)
        self.losses = np.array(PAPER["losses"], dtype=np.float32)
        self.tokens = np.arange(1, 11)
        self.meta = {"model": "fake"}
        if with_fields:
            self.fields = {"task": np.array(["a", "b"] * 5)}


class TestCommand:
    def test_run_writes_kept(self, tmp_path, monkeypatch, capsys):
        from gradsel_core.commands import select as cmd

        opened = []
        monkeypatch.setattr(cmd, "_open_store", lambda path: opened.append(path) or FakeStore())
        out = tmp_path / "sub" / "kept.jsonl"
        rc = cmd.run(_parse(["--scores", "DIR", "--ratio", "0.2", "--out", str(out)]))
        assert rc == 0 and opened == ["DIR"]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        # positions 6 and 7 kept; ids are reversed positions: s03, s02 -> ascending id order
        assert [r["id"] for r in rows] == ["s02", "s03"]
        assert rows[0]["norm"] == pytest.approx(2.2) and rows[0]["loss"] == 3.0 and rows[0]["tokens"] == 8
        printed = capsys.readouterr().out
        assert "{" not in printed and "kept 2 of 10" in printed  # a short table, not the JSON summary
        summary = json.loads((tmp_path / "sub" / "kept.summary.json").read_text())
        assert summary["kept"] == 2 and summary["median"] == pytest.approx(2.35)

    def test_run_group_by_and_params(self, tmp_path, monkeypatch, capsys):
        from gradsel_core.commands import select as cmd

        monkeypatch.setattr(cmd, "_open_store", lambda path: FakeStore())
        out = tmp_path / "kept.jsonl"
        rc = cmd.run(_parse(["--scores", "D", "--policy", "band", "--param", "low_q=0", "--param", "high_q=0.5",
                             "--loss-filter-std", "none", "--group-by", "task", "--out", str(out)]))
        assert rc == 0
        direct = select(FakeStore(), policy="band", low_q=0.0, high_q=0.5, loss_filter_std=None, group_by="task")
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == direct.kept_ids.tolist()
        assert json.loads((tmp_path / "kept.summary.json").read_text())["group_by"] == "task"

    def test_run_group_by_without_fields_errors(self, tmp_path, monkeypatch):
        from gradsel_core.commands import select as cmd
        from gradsel_core.errors import UsageError

        monkeypatch.setattr(cmd, "_open_store", lambda path: FakeStore(with_fields=False))
        out = tmp_path / "kept.jsonl"
        with pytest.raises(UsageError, match=r"--group-by 'task'.*no such field; its fields: \(none\)"):
            cmd.run(_parse(["--scores", "D", "--group-by", "task", "--out", str(out)]))
        assert not out.exists()

    def test_run_bad_policy(self, tmp_path, monkeypatch):
        from gradsel_core.commands import select as cmd

        monkeypatch.setattr(cmd, "_open_store", lambda path: FakeStore())
        with pytest.raises(ValueError, match="known policies"):
            cmd.run(_parse(["--scores", "D", "--policy", "bogus", "--out", str(tmp_path / "k.jsonl")]))


class TestManyGroups:
    """The segmented path (many groups at once) gives the per-group loop's mask and figures exactly."""

    @staticmethod
    def _data(seed: int, n: int = 3000, n_groups: int = 200, float32: bool = False):
        rng = np.random.default_rng(seed)
        norms = np.round(rng.gamma(2.0, 1.0, n), 1)  # rounded: many ties
        if float32:  # a store's norms: exact float32 (the packed sort), with -0.0 tying +0.0
            norms = norms.astype(np.float32).astype(np.float64)
            norms[rng.random(n) < 0.05] = 0.0
            norms[rng.random(n) < 0.05] = -0.0
        losses = np.round(rng.normal(2.0, 0.5, n), 2)
        norms[rng.random(n) < 0.02] = np.nan
        losses[rng.random(n) < 0.02] = np.inf
        groups = rng.zipf(1.5, n) % n_groups  # sizes from 1 to hundreds
        groups[:5] = n_groups + 1  # a group of 5 whose records are all invalid
        norms[:5] = np.nan
        return {"norms": norms, "losses": losses, "tokens": rng.integers(0, 60, n),
                "cosines": np.round(rng.uniform(-1, 1, n), 2), "g": groups}

    @staticmethod
    def _same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(TestManyGroups._same(a[k], b[k]) for k in a)
        if isinstance(a, float) and isinstance(b, float) and np.isnan(a):
            return bool(np.isnan(b))
        return a == b and type(a) is type(b)

    @pytest.mark.parametrize("policy", ["median_band", "keep_bottom", "keep_top", "drop_top", "drop_opposed",
                                        "project_band"])
    @pytest.mark.parametrize("lfs", ["auto", None, 0.5])
    @pytest.mark.parametrize("ratio", [0.0, 0.2, 1 / 3, 1.0])
    @pytest.mark.parametrize("float32", [False, True], ids=["f64", "f32"])
    def test_segmented_equals_loop(self, monkeypatch, policy, lfs, ratio, float32):
        import gradsel_core.selection as S

        d = self._data(int(ratio * 100) + len(policy), float32=float32)
        kw = dict(policy=policy, ratio=ratio, loss_filter_std=lfs, group_by="g")
        if policy not in ("drop_opposed", "project_band"):
            kw["score"] = "norm_per_token" if policy == "keep_top" else "norm"
            kw["loss_reduction"] = "mean"
        monkeypatch.setattr(S, "_VECTOR_MIN_GROUPS", 10 ** 9)
        loop = select(d, **kw)
        monkeypatch.setattr(S, "_VECTOR_MIN_GROUPS", 1)
        fast = select(d, **kw)
        assert loop.summary["n_groups"] > 100
        assert np.array_equal(loop.kept_mask, fast.kept_mask)
        assert self._same(loop.summary, fast.summary)

    @pytest.mark.parametrize("seed", range(6))
    def test_median_band_window_and_full_ranking_agree_with_loop(self, monkeypatch, seed):
        """The median band's nearest-window search (no sort of the distances) and the full ranking it hands
        over to when an edge is not proven both give the per-group loop's selection, on many groups with
        ties (symmetric around the median too), NaNs and groups of every size."""
        import gradsel_core.selection as S

        rng = np.random.default_rng(seed)
        n = 4000
        d = self._data(seed, n=n, n_groups=[50, 300, 1500][seed % 3], float32=bool(seed % 2))
        d["norms"] = np.where(rng.random(n) < 0.3, np.round(d["norms"]), d["norms"])  # integer ties, both sides
        kw = dict(policy="median_band", ratio=[0.1, 0.5, 0.9][seed % 3], group_by="g", loss_filter_std=None)
        monkeypatch.setattr(S, "_VECTOR_MIN_GROUPS", 10 ** 9)
        loop = select(d, **kw)
        monkeypatch.setattr(S, "_VECTOR_MIN_GROUPS", 1)
        calls = []
        real = S._closest_to_median
        monkeypatch.setattr(S, "_closest_to_median", lambda *a: calls.append(real(*a)) or calls[-1])
        fast = select(d, **kw)
        assert calls and calls[0] is not None  # the window path decided (its edge was proven)
        monkeypatch.setattr(S, "_closest_to_median", lambda *a: None)
        ranked = select(d, **kw)
        for other in (fast, ranked):
            assert np.array_equal(loop.kept_mask, other.kept_mask)
            assert self._same(loop.summary, other.summary)

    def test_labels_in_first_appearance_order(self):
        d = {"norms": np.arange(9.0), "losses": np.ones(9)}
        for labels, want in [
            (np.array([3, 1, 3, 2, 1, 2, 7, 7, 3]), ["3", "1", "2", "7"]),
            (np.array([2.5, np.nan, 2.5, 1.0, np.nan, 1.0, 4.0, 4.0, 2.5]), ["2.5", "None", "1.0", "4.0"]),
            (np.array(["b", None, "a", "b", np.nan, "c", "a", "c", "b"], dtype=object), ["b", "None", "a", "c"]),
            (np.array(["b", "a", "a", "c", "b", "b", "c", "c", "a"]), ["b", "a", "c"]),
            (np.array([True, False, True, True, False, False, True, True, True]), ["True", "False"]),
        ]:
            s = select(d, policy="keep_bottom", ratio=1.0, group_by=labels).summary
            assert list(s["groups"]) == want
            for key, g in s["groups"].items():
                assert g["n"] == sum(1 for v in labels.tolist() if str(None if v != v else v) == key)

    def test_group_order_radix_beyond_16_bits(self):
        from gradsel_core.selection import _group_order

        rng = np.random.default_rng(0)
        codes = rng.integers(0, 100_000, 150_000)
        values = np.round(rng.random(150_000), 2)
        assert np.array_equal(_group_order(codes, 100_000), np.argsort(codes, kind="stable"))
        assert np.array_equal(_group_order(codes, 100_000, values), np.lexsort((np.arange(150_000), values, codes)))
        v32 = values.astype(np.float32).astype(np.float64)  # exact float32: the packed sort, -0.0 tying +0.0
        v32[::7] = -0.0
        v32[::11] = 0.0
        v32[::13] *= -1
        assert np.array_equal(_group_order(codes, 100_000, v32), np.lexsort((np.arange(150_000), v32, codes)))


@pytest.mark.parametrize("pandas_from", [0, 10**9], ids=["pandas", "python"])
def test_string_grouping_and_id_checks_agree_with_and_without_pandas(pandas_from, monkeypatch):
    """Large object arrays hash with pandas (when installed), small ones in Python: the same groups, in
    first-appearance order with the missing group where it first appears, and the same duplicate check."""
    from gradsel_core import selection as S

    if pandas_from == 0:
        pytest.importorskip("pandas")
    monkeypatch.setattr(S, "_PANDAS_FROM", pandas_from)
    labels = np.array(["b", None, "a", "b", float("nan"), "c", "a"], dtype=object)
    firsts, codes = S._factorize_objects(labels)
    assert firsts == ["b", None, "a", "c"] and codes.tolist() == [0, 1, 2, 0, 1, 3, 2]
    S._check_ids(np.array(["x", "y", "z"], dtype=object))
    with pytest.raises(ValueError, match="duplicated: \\['y'\\]"):
        S._check_ids(np.array(["x", "y", "z", "y"], dtype=object))
