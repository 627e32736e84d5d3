"""`--data-dir hub`: the hub's benchmark rows become a ../shared/data/eval layout that the
task loaders read (the download itself is replaced by rows in the hub's formats)."""

import pytest

from cca_jax.errors import CCAError
from cca_jax.evaluate import hub_data, tasks

ALL = ["mmlu_5shot", "truthfulqa_mc1", "truthfulqa_mc2", "triviaqa_5shot", "gsm8k_cot_8shot"]


def hub_rows(repo, prefix):
    """Rows as the hub's parquet files hold them (cais/mmlu, truthful_qa, trivia_qa, gsm8k)."""
    if repo == "cais/mmlu":
        split = "dev" if "dev" in prefix else "test"
        return [{"question": f"{s} {split} q{i}, with a comma", "subject": s, "choices": ["w", "x, y", "z", '"q"'],
                 "answer": i % 4} for s in ("anatomy", "virology") for i in range(5 if split == "dev" else 3)]
    if repo == "truthfulqa/truthful_qa":
        return [{"question": f"q{i}?", "mc1_targets": {"choices": ["right", "wrong"], "labels": [1, 0]},
                 "mc2_targets": {"choices": ["right", "also right", "wrong"], "labels": [1, 1, 0]}} for i in range(4)]
    if repo == "mandarjoshi/trivia_qa":
        return [{"question": f"Which city {i}?", "answer": {"value": "Paris", "aliases": ["Paris", "Paree"],
                                                            "normalized_aliases": ["paris"]}} for i in range(8)]
    if repo == "openai/gsm8k":
        return [{"question": "2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}, {"question": "1,000 + 1?",
                                                                                  "answer": "#### 1,001"}]
    raise AssertionError(repo)


def test_hub_rows_load_like_the_shared_folder(tmp_path):
    calls = []

    def fetch(repo, prefix):
        calls.append((repo, prefix))
        return hub_rows(repo, prefix)

    root = hub_data.materialize(ALL, tmp_path, fetch=fetch, log=lambda *_: None)
    data = tasks.prepare(ALL, limit=3, data_dir=root)
    mmlu, dev = data["mmlu"]
    assert sorted(dev) == ["anatomy", "virology"] and len(dev["anatomy"]) == 5
    assert [it.subject for it in mmlu] == ["anatomy", "virology", "anatomy"]  # round-robin
    assert mmlu[0].choices == ("w", "x, y", "z", '"q"') and mmlu[0].answer == "A" and dev["anatomy"][1].answer == "B"
    tqa = data["truthfulqa"]
    assert len(tqa) == 3 and tqa[0].mc1 == (("right", 1), ("wrong", 0)) and tqa[0].mc2[1] == ("also right", 1)
    trivia, shots = data["triviaqa"]
    assert len(shots) == 5 and len(trivia) == 3
    assert trivia[0].question == "Which city 5?" and trivia[0].aliases == ("Paris", "Paree")
    assert [g.gold for g in data["gsm8k"]] == [5.0, 1001.0]
    assert len(calls) == 5  # mmlu test + dev, truthfulqa, triviaqa, gsm8k: one fetch each
    hub_data.materialize(ALL, tmp_path, fetch=fetch, log=lambda *_: None)
    assert len(calls) == 5  # finished tasks are not fetched again


def test_data_dir_hub_uses_the_cache_and_only_the_tasks_asked_for(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setenv(hub_data.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setattr(hub_data, "fetch_rows", lambda repo, prefix: fetched.append(repo) or hub_rows(repo, prefix))
    data = tasks.prepare(["gsm8k_cot_8shot"], data_dir="hub")
    assert data["data_dir"] == str(tmp_path / "cache") and fetched == ["openai/gsm8k"]
    assert (tmp_path / "cache" / "gsm8k" / "test.jsonl").exists() and not (tmp_path / "cache" / "mmlu").exists()
    monkeypatch.setenv(tasks.ENV_DATA, "hub")
    assert tasks.prepare(["gsm8k_cot_8shot"])["data_dir"] == str(tmp_path / "cache") and fetched == ["openai/gsm8k"]


def test_a_malformed_hub_row_or_no_download_is_one_line(tmp_path, monkeypatch):
    bad = lambda repo, prefix: [{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}]
    with pytest.raises(CCAError, match="4 choices"):
        hub_data.materialize(["mmlu_5shot"], tmp_path, fetch=bad, log=lambda *_: None)
    assert not (tmp_path / "mmlu" / ".done").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CCAError) as err:  # no pyarrow here, or no network: either way one line naming the fix
        hub_data.fetch_rows("openai/gsm8k", "main/test-")
    msg = str(err.value)
    assert "\n" not in msg and ("pip install pyarrow" in msg or "--data-dir DIR" in msg)
