"""evaluation/world_goals.py on hand-made evaluate.py outputs: the figures it prints are the
hand-computed ones."""
import json

from evaluation import world_goals


def _model(name, hhh, dims, by_kind):
    return {"name": name, "metrics": {"hhh": hhh, "harmful": 0.25, "over_refusal": 0.5},
            "details": {"dimensions": dict(zip(world_goals.DIMS, dims)), "by_kind": by_kind},
            "routing": {"routing_acc_example": 0.9}}


def test_goals_on_two_hand_made_seeds(tmp_path, capsys):
    kinds = {"helpful/fact": {"n": 3, "right": 0.5, "well_formed": 1.0},
             "helpful/task": {"n": 1, "right": 0.2, "well_formed": 0.6},
             "harmless/benign": {"n": 2, "right": 0.5, "well_formed": 0.5},
             "honest/unknowable": {"n": 2, "right": 1.0, "well_formed": 1.0}}
    dirs = []
    for seed, scale in ((0, 1.0), (1, 0.5)):
        models = [_model(e, 0.4 * scale, (0.6 * scale, 0.2, 0.1), kinds)
                  for e in world_goals.EXPERTS]
        models += [_model("oracle", 0.8 * scale, (0, 0, 0), kinds),
                   _model("h3fusion", 0.7 * scale, (0, 0, 0), kinds)]
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"models": models}))
        dirs.append(str(d))
    runs = world_goals.load(dirs)
    assert world_goals.well_formed_on(runs[0]["helpful"], 0) == (3 * 1.0 + 1 * 0.6) / 4
    world_goals.main(dirs)
    out = capsys.readouterr().out
    assert "oracle / best single 200.0 [200.0, 200.0]" in out  # 0.8 / 0.4 on both seeds
    assert "gap to the oracle closed 75.0 [75.0, 75.0]" in out  # (0.7 - 0.4) / (0.8 - 0.4)
    assert ("helpful: well formed on its dimension 90.0 [90.0, 90.0], "
            "lead there 0.0 [0.0, 0.0]") in out


def test_goals_of_stage_one_alone_stop_before_the_fusion_lines(tmp_path, capsys):
    kinds = {f"{e}/x": {"n": 2, "right": 0.5, "well_formed": 1.0} for e in world_goals.EXPERTS}
    models = [_model(e, 0.4, (0.6, 0.2, 0.1), kinds) for e in world_goals.EXPERTS]
    (tmp_path / "results.json").write_text(json.dumps(
        {"models": models + [_model("oracle", 0.6, (0, 0, 0), kinds)]}))
    world_goals.main([str(tmp_path)])  # evaluate.py --baselines without a fused model
    out = capsys.readouterr().out
    assert "oracle / best single 150.0 [150.0, 150.0]" in out and "h3fusion" not in out
