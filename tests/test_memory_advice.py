"""What the memory refusal advises (plumbing/memory.py): it names the CODEBOOK_MEMORY_LIMIT override with a value
that lets the run start; for training it offers more gradient-accumulation steps first (the same batch size and
recipe), with a value that divides the batch and fits; and it counts a training run's activations at the dtype the
run uses (bf16 under autocast: 2 bytes). CPU: CODEBOOK_MEMORY_LIMIT stands for a CUDA device's memory."""

import re
from dataclasses import replace

import pytest

import train
from model import GPTConfig
from plumbing import memory


def refusal(cfg, gcfg, device="cpu"):
    with pytest.raises(memory.ConfigError) as e:
        memory.check_training(cfg, gcfg, 1, device)
    return str(e.value)


def test_accumulation_first_then_the_override(monkeypatch):
    cfg, gcfg = train.TrainConfig(device="cpu", batch_size=1024), GPTConfig()
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", "4e8")
    msg = refusal(cfg, gcfg)
    m = re.search(r"allows 400.0 MB: raise --gradient_accumulation_steps \(to ([0-9,]+), the same batch size and "
                  r"recipe, in more micro-steps\) or lower --batch_size \(to about [0-9,]+\)", msg)
    assert m, msg
    steps = int(m.group(1).replace(",", ""))
    assert 1024 % steps == 0 and memory.check_training(replace(cfg, gradient_accumulation_steps=steps), gcfg, 1,
                                                       "cpu") <= 4e8
    assert memory.check_training(replace(cfg, gradient_accumulation_steps=steps // 2), gcfg, 1, "cpu") > 4e8 \
        if steps > 2 else True  # the fewest steps that fit
    allow = re.search(r"CODEBOOK_MEMORY_LIMIT=([0-9.e]+) lets this run start\)$", msg)
    assert allow, msg
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", allow.group(1))
    memory.check_training(cfg, gcfg, 1, "cpu")  # the value named is enough


def test_the_override_is_named_where_the_machine_sets_the_limit():
    cfg = train.TrainConfig(device="cpu", batch_size=10**9)
    msg = refusal(cfg, GPTConfig())
    assert "cpu has " in msg and "the environment variable CODEBOOK_MEMORY_LIMIT sets the limit" in msg, msg


def test_bf16_activations_count_two_bytes(monkeypatch):
    """A run dominated by its activations: under bf16 autocast (--dtype=bfloat16, or auto on CUDA) they count 2
    bytes, so its estimate is a little above half the fp32 one; the weights and the optimizer do not change."""
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", "1e15")
    cfg, gcfg = train.TrainConfig(device="cpu", batch_size=4096, kmeans_init=False), GPTConfig()
    for device in ("cpu", "cuda"):
        fp32 = memory.check_training(replace(cfg, dtype="float32"), gcfg, 1, device)
        bf16 = memory.check_training(replace(cfg, dtype="bfloat16"), gcfg, 1, device)
        assert 0.5 < bf16 / fp32 < 0.6, (device, fp32, bf16)
    assert memory.check_training(cfg, gcfg, 1, "cuda") == bf16  # auto: bf16 autocast on CUDA, fp32 elsewhere
    assert memory.check_training(cfg, gcfg, 1, "cpu") == memory.check_training(replace(cfg, dtype="float32"), gcfg, 1,
                                                                                 "cpu")
