"""python -m evaluation.report: an evaluation's plots drawn again from its results.json (the
README's figure), with matplotlib optional."""
import json
import sys

import pytest

from evaluation import report

RESULTS = {
    "suite": "toy", "data": "runs/toy/data",
    "models": [
        {"name": "base", "kind": "dense",
         "metrics": {"helpful": 0.2, "harmful": 0.6, "truthful": 0.3}, "routing": None},
        {"name": "h3fusion", "kind": "fused",
         "metrics": {"helpful": 0.6, "harmful": 0.1, "truthful": 0.7},
         "routing": {"usage_top1": {"helpful": [[0.7, 0.2, 0.1], [0.8, 0.1, 0.1]],
                                    "harmless": [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]],
                                    "honest": [[0.1, 0.1, 0.8], [0.2, 0.1, 0.7]]}}},
    ],
}


@pytest.fixture
def eval_dir(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    return tmp_path


def test_without_matplotlib_it_says_how_to_get_it(eval_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert report.plot_results(RESULTS, str(eval_dir)) == []
    with pytest.raises(ValueError, match="pip install matplotlib"):
        report.main([str(eval_dir)])


def test_bad_input_is_named(eval_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/results.json: not found"):
        report.main([str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"--models h3: .* has no row \['h3'\]"):
        report.main([str(eval_dir), "--models", "h3"])


def test_it_draws_the_chosen_rows(eval_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    report.main([str(eval_dir), "--out", str(out), "--models", "h3fusion"])
    assert sorted(p.name for p in out.iterdir()) == ["routing_h3fusion.png", "scores.png"]
    assert (out / "routing_h3fusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
