"""The recipes (``zuoyou.train.recipes``): each later one is the one before it with one change, and a run folder
of the one before resumes at its new stage."""

from __future__ import annotations

import pytest

from zuoyou.train.recipes import RECIPES
from zuoyou.train.shapes import stages


def test_recipe_v6_is_v4_with_a_longer_encoder_pretraining():
    import dataclasses

    assert RECIPES["v6"] == dataclasses.replace(RECIPES["v4"], encoder_minutes=24.0)
    # the encoder stays frozen in stage 1 while the random aligner learns to read it, as in v4
    assert [s.frozen for s in stages(80, recipe=RECIPES["v6"])] == [s.frozen for s in stages(80, recipe=RECIPES["v4"])]


def test_recipe_v7_is_v6_on_the_deterministic_v2_vq_with_absolute_encoder_labels():
    import dataclasses

    v2 = RECIPES["v2"]
    want = dataclasses.replace(RECIPES["v6"], vq=v2.vq, fold_codes=v2.fold_codes, vq_minutes=v2.vq_minutes,
                               encoder_absolute=True)
    assert RECIPES["v7"] == want
    # the wide input drawn from N(0, 1), not v2's codebook copy (8-d, which a 256-wide gen_embed cannot take)
    assert not RECIPES["v7"].embed_from_codebook and RECIPES["v7"].gen_embed_dim == 256


def test_recipe_v8_is_v6_with_the_canvas_label_alone():
    import dataclasses

    assert RECIPES["v8"] == dataclasses.replace(RECIPES["v6"], encoder_absolute=True)
    assert RECIPES["v8"].vq == RECIPES["v6"].vq and not RECIPES["v8"].fold_codes  # v6's (v1's) VQ recipe


def test_recipe_v9_is_v6_with_more_geneval_style_prompts():
    import dataclasses

    assert RECIPES["v9"] == dataclasses.replace(RECIPES["v6"], prompt_share=0.8)
    v6, v9 = stages(80, recipe=RECIPES["v6"]), stages(80, recipe=RECIPES["v9"])
    assert [(s.name, s.minutes, s.lr, s.mix, s.frozen) for s in v9] == [(s.name, s.minutes, s.lr, s.mix, s.frozen) for s in v6]
    # stage 1 keeps its simple prompts (the data's default share); v6's later stages pass that same share
    assert [s.options for s in v6] == [{"simple": True}, {"prompt_share": 0.5}, {"prompt_share": 0.5}]
    assert [s.options for s in v9] == [{"simple": True}, {"prompt_share": 0.8}, {"prompt_share": 0.8}]


def test_recipe_v10_is_v9_with_a_warm_restart_of_sft():
    import dataclasses

    assert RECIPES["v10"] == dataclasses.replace(RECIPES["v9"], stage3b=(25.0, 3e-4, 0.8))
    v9, v10 = stages(80, recipe=RECIPES["v9"]), stages(80, recipe=RECIPES["v10"])
    assert v10[:3] == v9  # a v9 run folder resumes at the fourth stage
    last = v10[3]
    assert (last.name, last.minutes, last.lr, last.warmup, last.decay, last.mix, last.options) == (
        "stage3b", 25.0, 3e-4, 50, True, v9[2].mix, {"prompt_share": 0.8})


def test_recipe_v11_is_v10_with_a_second_restart():
    import dataclasses

    assert RECIPES["v11"] == dataclasses.replace(RECIPES["v10"], restarts=2)
    v10, v11 = stages(80, recipe=RECIPES["v10"]), stages(80, recipe=RECIPES["v11"])
    assert v11[:4] == v10  # a v10 run folder resumes at the fifth stage
    assert v11[4] == dataclasses.replace(v10[3], name="stage3c")


def test_recipe_v12_is_v11_with_a_third_restart():
    import dataclasses

    assert RECIPES["v12"] == dataclasses.replace(RECIPES["v11"], restarts=3)
    v11, v12 = stages(80, recipe=RECIPES["v11"]), stages(80, recipe=RECIPES["v12"])
    assert v12[:5] == v11 and v12[5] == dataclasses.replace(v11[4], name="stage3d")


def test_recipe_v13_is_v12_with_a_fourth_restart_in_the_named_order():
    import dataclasses

    assert RECIPES["v13"] == dataclasses.replace(RECIPES["v12"], restarts=4, named_order=("stage3e",))
    v12, v13 = stages(80, recipe=RECIPES["v12"]), stages(80, recipe=RECIPES["v13"])
    assert v13[:6] == v12  # a v12 run folder resumes at the seventh stage
    assert v13[6] == dataclasses.replace(v12[5], name="stage3e", options={"prompt_share": 0.8, "named_order": True})


def test_recipe_v14_is_v13_with_a_fifth_restart_in_the_named_order():
    import dataclasses

    assert RECIPES["v14"] == dataclasses.replace(RECIPES["v13"], restarts=5, named_order=("stage3e", "stage3f"))
    v13, v14 = stages(80, recipe=RECIPES["v13"]), stages(80, recipe=RECIPES["v14"])
    assert v14[:7] == v13 and v14[7] == dataclasses.replace(v13[6], name="stage3f")


def test_recipe_v15_is_v14_with_a_sixth_restart_in_the_named_order():
    import dataclasses

    assert RECIPES["v15"] == dataclasses.replace(RECIPES["v14"], restarts=6,
                                                 named_order=("stage3e", "stage3f", "stage3g"))
    v14, v15 = stages(80, recipe=RECIPES["v14"]), stages(80, recipe=RECIPES["v15"])
    assert v15[:8] == v14 and v15[8] == dataclasses.replace(v14[7], name="stage3g")


def test_recipe_v16_is_v15_with_a_seventh_restart_weighted_to_the_weak_categories():
    import dataclasses

    assert RECIPES["v16"] == dataclasses.replace(
        RECIPES["v15"], restarts=7, named_order=("stage3e", "stage3f", "stage3g", "stage3h"),
        category_weights=(1, 1.5, 1.5, 1, 1, 2), weighted=("stage3h",))
    v15, v16 = stages(80, recipe=RECIPES["v15"]), stages(80, recipe=RECIPES["v16"])
    assert v16[:9] == v15  # a v15 run folder resumes at the tenth stage
    assert v16[9] == dataclasses.replace(v15[8], name="stage3h", options={
        "prompt_share": 0.8, "named_order": True, "category_weights": (1, 1.5, 1.5, 1, 1, 2)})


def test_recipe_v17_is_v16_with_an_eighth_restart_weighted_the_same_way():
    import dataclasses

    assert RECIPES["v17"] == dataclasses.replace(
        RECIPES["v16"], restarts=8, named_order=RECIPES["v16"].named_order + ("stage3i",),
        weighted=("stage3h", "stage3i"))
    v16, v17 = stages(80, recipe=RECIPES["v16"]), stages(80, recipe=RECIPES["v17"])
    assert v17[:10] == v16 and v17[10] == dataclasses.replace(v16[9], name="stage3i")


def test_recipe_v18_is_v17_with_a_ninth_restart_weighted_the_same_way():
    import dataclasses

    assert RECIPES["v18"] == dataclasses.replace(
        RECIPES["v17"], restarts=9, named_order=RECIPES["v17"].named_order + ("stage3j",),
        weighted=("stage3h", "stage3i", "stage3j"))
    v17, v18 = stages(80, recipe=RECIPES["v17"]), stages(80, recipe=RECIPES["v18"])
    assert v18[:11] == v17 and v18[11] == dataclasses.replace(v17[10], name="stage3j")


def test_recipe_v19_is_v18_with_crowded_scenes_in_its_last_stage():
    import dataclasses

    assert RECIPES["v19"] == dataclasses.replace(RECIPES["v18"], crowded_share=0.1, crowded=("stage3j",))
    v18, v19 = stages(80, recipe=RECIPES["v18"]), stages(80, recipe=RECIPES["v19"])
    assert v19[:11] == v18[:11]
    assert v19[11] == dataclasses.replace(v18[11], options={**v18[11].options, "crowded_share": 0.1})


def test_recipe_v20_is_v19_with_its_own_drawings_in_its_last_stage():
    import dataclasses

    assert RECIPES["v20"] == dataclasses.replace(RECIPES["v19"], own_share=0.2, own=("stage3j",))
    v19, v20 = stages(80, recipe=RECIPES["v19"]), stages(80, recipe=RECIPES["v20"])
    assert v20[:11] == v19[:11]
    assert v20[11] == dataclasses.replace(v19[11], options={**v19[11].options, "own_share": 0.2, "own_pool": 2048})


def test_recipe_v21_is_v20_with_a_tenth_restart_of_the_same_kind():
    import dataclasses

    v20 = RECIPES["v20"]
    assert RECIPES["v21"] == dataclasses.replace(
        v20, restarts=10, named_order=v20.named_order + ("stage3k",), weighted=v20.weighted + ("stage3k",),
        crowded=("stage3j", "stage3k"), own=("stage3j", "stage3k"))
    a, b = stages(80, recipe=v20), stages(80, recipe=RECIPES["v21"])
    assert b[:12] == a and b[12] == dataclasses.replace(a[11], name="stage3k")


def test_recipe_v22_is_v21_with_its_decoder_polished():
    import dataclasses

    assert RECIPES["v22"] == dataclasses.replace(RECIPES["v21"], decoder_minutes=30.0)
    assert stages(80, recipe=RECIPES["v22"]) == stages(80, recipe=RECIPES["v21"])  # the LM's stages are v21's
    # every later recipe builds on v22 and keeps its polished decoder
    assert all((r.decoder_minutes == 30.0) == (int(name[1:]) >= 22) for name, r in RECIPES.items())


@pytest.mark.parametrize("name, before, stage", [("v23", "v22", "stage3l"), ("v24", "v23", "stage3m")])
def test_recipes_v23_and_v24_add_one_restart_of_the_same_kind(name, before, stage):
    import dataclasses

    prev = RECIPES[before]
    assert RECIPES[name] == dataclasses.replace(
        prev, restarts=prev.restarts + 1, named_order=prev.named_order + (stage,), weighted=prev.weighted + (stage,),
        crowded=prev.crowded + (stage,), own=prev.own + (stage,))
    a, b = stages(80, recipe=prev), stages(80, recipe=RECIPES[name])
    assert b[:-1] == a and b[-1] == dataclasses.replace(a[-1], name=stage)
