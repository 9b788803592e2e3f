"""The training data path on a built dataset: mixing by ratio, determinism, resume, packing."""

import collections

import pytest

from unimedvl.training.data import BatchStream, DatasetIndex, MixtureSampler
from unimedvl.training.plan import PlanError, load_plan, parse_plan


class ToyTokenizer:
    def encode(self, text):
        return [ord(c) % 2000 + 10 for c in text]


def test_shipped_plans_validate_with_the_papers_numbers():
    plan = load_plan("unimedvl")
    assert [s.steps for s in plan.stages] == [85000, 120000, 70000] and plan.total_steps == 275000
    assert [s.lr for s in plan.stages] == [5e-5, 2.5e-5, 1e-5]
    assert plan.stages[2].mixture["interleaved"] == pytest.approx(0.25)
    assert plan.stages[0].frozen == ("vae_model",) and "vit_model" in plan.stages[1].frozen
    assert plan.stages[0].ce_weight == 0.25 and plan.stages[0].ema_decay == 0.995
    assert plan.stage_at(85000) == (1, 0) and plan.stage_at(275000) == (3, 0)
    stage = plan.stages[0]
    assert stage.lr_at(0) == pytest.approx(5e-5 / 2000) and stage.lr_at(5000) == 5e-5
    demo = load_plan("demo")
    assert demo.preset == "tiny" and len(demo.stages) == 3
    with pytest.raises(PlanError, match=r"stages\[0\]: unknown field\(s\) \['learning_rate'\]"):
        parse_plan({"stages": [{"name": "a", "steps": 1, "mixture": {"generation": 1}, "learning_rate": 1}]})
    with pytest.raises(PlanError, match="mixture needs"):
        parse_plan({"stages": [{"name": "a", "steps": 1, "mixture": {"videos": 1}}]})
    with pytest.raises(PlanError, match="steps must be int"):
        parse_plan({"stages": [{"name": "a", "steps": 1.5, "mixture": {"generation": 1}}]})


def test_mixture_follows_the_stage_ratios_and_is_reproducible(demo_dataset):
    stage = load_plan("demo").stages[2]
    index = DatasetIndex(demo_dataset)
    sampler = MixtureSampler(index, stage, seed=7)
    assert sampler.missing == ["text"]  # the demo has no text-only records: its share is redistributed
    draws = [sampler.next() for _ in range(3000)]
    counts = collections.Counter(f for f, _ in draws)
    expected = {f: p / (1 - stage.mixture["text"]) for f, p in stage.mixture.items() if f != "text"}
    for family, p in expected.items():
        assert counts[family] / 3000 == pytest.approx(p, abs=0.03), family
    again = MixtureSampler(index, stage, seed=7)
    assert [again.next() for _ in range(3000)] == draws
    # every record of a source is seen once per pass before any repeats
    (family, source), members = max(index.groups.items(), key=lambda kv: len(kv[1]))
    seen = [r for f, r in draws if f == family and r in set(members)][: len(members)]
    assert len(seen) == len(members) and len(set(seen)) == len(members)


def test_batch_stream_resumes_exactly_and_respects_the_budget(demo_dataset):
    stage = load_plan("demo").stages[0]
    index = DatasetIndex(demo_dataset)
    stream = BatchStream(index, MixtureSampler(index, stage, seed=1), ToyTokenizer(), stage, seed=1)
    from unimedvl.training.data import estimate_tokens

    batches = [stream.next_batch() for _ in range(4)]
    for b in batches:
        sizes = [estimate_tokens(p, stream.vit, stream.vae) for _, p in b]
        assert sum(sizes) <= stage.tokens_per_batch or len(b) == 1
    state = stream.state_dict()
    later = [stream.next_batch() for _ in range(3)]
    resumed = BatchStream(index, MixtureSampler(index, stage, seed=1), ToyTokenizer(), stage, seed=1)
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(3)]
    flat = lambda bs: [(f, [(i.kind, i.ids, None if i.pixels is None else i.pixels.tobytes()) for i in p]) for b in bs for f, p in b]  # noqa: E731
    assert flat(again) == flat(later)
