"""Cost measurement and projection (issue #13 parts 1 and 3): the counts are right on small configs,
the published configs build at their published sizes, and the demo benchmark's step runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mllm_unlearn.experiments.cost import (
    MetaModel,
    Pass,
    Shapes,
    flash_like_sdpa,
    method_steps,
    project,
    trained_methods,
)
from mllm_unlearn.models.published import PUBLISHED, build_on_meta, published_config
from mllm_unlearn.models.tiny import corpus_for

ROOT = Path(__file__).resolve().parents[1]
SHAPES = Shapes(text_tokens=40, answer_tokens=10, batch_size=4, cvf_options=("retain_batch_size=8",), queue_size=16)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """A small LLaVA config in the published files' format: 2 CLIP layers at 56 px (16 image tokens),
    2 Llama layers of width 512 (attention is ~2 % of the matmul work at these lengths)."""
    cfg = json.loads((ROOT / "configs" / "models" / "llava-1.5-7b.json").read_text())
    cfg["vision_config"].update(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
    )
    cfg["text_config"].update(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    cfg["image_token_index"], cfg["pad_token_id"], cfg["image_seq_length"] = 998, 999, 16
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    path.write_text(json.dumps(cfg))
    return path


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,params", [("llava-1.5-7b", 7.06e9), ("qwen2-vl-7b", 8.29e9)])
def test_published_configs_build_at_their_published_size(name, params):
    model = build_on_meta(published_config(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / params - 1) < 0.01, n
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert set(PUBLISHED) == {"llava-1.5-7b", "qwen2-vl-7b"}


def test_forward_flops_equal_the_hand_count(small_config):
    mm = MetaModel(str(small_config), "llm", frozen_a=False, shapes=SHAPES)
    for p in (Pass(4, 0, grad=False), Pass(4, 2, grad=False)):
        counted = count(lambda p=p: mm.run(p))
        assert counted > 0
        assert abs(mm.hand_flops([p], visual_grad=False) / counted - 1) < 0.10, p


def test_backward_costs_twice_the_forward_for_trained_weights_once_for_frozen():
    x = torch.empty(64, 256, device="meta", requires_grad=True)
    trained = torch.nn.Linear(256, 512, bias=False, device="meta")
    frozen = torch.nn.Linear(256, 512, bias=False, device="meta").requires_grad_(False)
    fwd = count(lambda: trained(x))
    assert count(lambda: trained(x).sum().backward()) == pytest.approx(3 * fwd)  # fwd + dW + dx
    assert count(lambda: frozen(x).sum().backward()) == pytest.approx(2 * fwd)  # fwd + dx only


def test_the_fused_attention_stand_in_computes_attention_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 10, 8, generator=g, requires_grad=True) for h in (4, 2, 2))  # GQA: 2 groups
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = flash_like_sdpa(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_a_lora_step_through_the_llm_costs_about_twice_its_forward(small_config):
    mm = MetaModel(str(small_config), "llm", frozen_a=False, shapes=SHAPES)
    fwd = count(lambda: mm.run(Pass(4, 2, grad=False)))
    step = count(lambda: mm.step_loss([Pass(4, 2)]).backward())
    assert 1.9 < step / fwd < 2.3  # base weights frozen: backward = input gradients (+ LoRA, attention)


def test_visual_only_gradient_is_cheaper_than_lora_on_the_llm(small_config):
    visual = MetaModel(str(small_config), "visual", frozen_a=True, shapes=SHAPES)
    llm = MetaModel(str(small_config), "llm", frozen_a=False, shapes=SHAPES)
    cvf_visual = count(lambda: visual.step_loss(method_steps("cvf_ncu", SHAPES)[0][:2]).backward())
    full = count(lambda: llm.step_loss([Pass(8, 8)]).backward())
    assert 0 < cvf_visual < full


def test_every_method_projects_with_no_reference_copy(small_config):
    costs = {m: project(str(small_config), m, SHAPES) for m in trained_methods()}
    assert {"cvf_ncu", "ga_diff", "siu", "npo"} <= set(costs) and "manu" not in costs
    for c in costs.values():
        assert c.flops > 0 and c.activation_bytes > 0 and c.reference_copies == 0
        assert abs(c.hand_flops / c.flops - 1) < 0.15, (c.method, c.hand_flops / c.flops)
        assert sum(c.flops_by_part.values()) == pytest.approx(c.flops, rel=0.01)
    # a reference pass adds forward work: NPO = GA_Diff + one reference forward of the forget batch
    assert costs["npo"].flops > costs["ga_diff"].flops
    assert costs["cvf_ncu"].trainable_params < costs["ga_diff"].trainable_params


def test_the_demo_benchmark_measures_a_step(setup):
    root, world, _, model = setup
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [
        bench.measure(
            argparse.Namespace(
                what=m,
                model=str(model),
                published=None,
                data=str(world),
                steps=2,
                warmup=1,
                dtype="fp32",
                batch_size=None,
                image_size=None,
            )
        )
        for m in ("ga_diff", "cvf_ncu")
    ]
    for r in rows:
        assert r["step_s"] > 0 and r["flops"] > 0 and r["peak_bytes"] > 0
        assert r["tensor_bytes"] > 4 * r["trainable_params"]
    assert rows[1]["scope"] == "visual" and rows[0]["scope"] == "llm"
    ga_diff_row = next(line for line in bench.table(rows).splitlines() if line.startswith("ga_diff"))
    assert ga_diff_row.split()[4] == "1.00"  # its own ratio


# shrunk published configs: the published image processing and vocabulary, 1-2 layers of small width
_SHRINK = {
    "llava-1.5-7b": {
        "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
        "text_config": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
        ),
    },
    "qwen2-vl-7b": {
        "vision_config": dict(depth=1, embed_dim=64, num_heads=4, hidden_size=64),
        "text_config": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
    },
}


@pytest.mark.parametrize("name,image_tokens", [("llava-1.5-7b", 576), ("qwen2-vl-7b", 256)])
def test_a_random_published_model_has_the_published_shapes_and_trains(setup, name, image_tokens):
    """The GPU benchmark's model (``--published``): the published config's architecture with random
    weights, the world's tokenizer inside the published vocabulary, the published image grid."""
    from mllm_unlearn.models.published import build_random
    from mllm_unlearn.models.scoring import encode_pairs

    _, _, data, _ = setup
    arch = published_config(name).model_type
    lm = build_random(name, corpus_for(data, arch), dtype=torch.float32, overrides=_SHRINK[name])
    config = lm.model.config
    assert config.text_config.vocab_size == published_config(name).text_config.vocab_size
    assert config.image_token_id < len(lm.processor.tokenizer) <= config.text_config.vocab_size
    sample = next(s for s in data.train if s.image is not None)
    batch = encode_pairs(lm, [sample])
    assert int((batch.inputs["input_ids"] == config.image_token_id).sum()) == image_tokens
    loss = lm.model(**batch.inputs, labels=batch.labels).loss
    assert torch.isfinite(loss) and loss.item() > 5  # random weights over a 32 k / 152 k vocabulary
    again = build_random(name, corpus_for(data, arch), dtype=torch.float32, overrides=_SHRINK[name]).model
    assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), again.parameters()))  # seeded
