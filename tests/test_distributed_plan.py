"""Several GPUs and hosts in the planner, the job file and the torchrun command lines (no processes started)."""

from pathlib import Path

import pytest

from runner.errors import UserErrors
from runner.hosts import Host, Inventory
from runner.launch import Rendezvous, node_argvs, trainer_argv
from runner.plan import plan_job, resolve
from runner.plan.memory import estimate_memory
from runner.presets import PRESETS
from runner.spec import load_jobs

GiB = 2**30
INVENTORY = Inventory({
    "local": Host(name="local", kind="local", profile="cpu"),
    "h100x1": Host(name="h100x1", profile="h100-80gb", gpus=1, price_usd_per_hour=2.5),
    "h100x2": Host(name="h100x2", profile="h100-80gb", gpus=2, price_usd_per_hour=5.0),
    "h100x8": Host(name="h100x8", profile="h100-80gb", gpus=8, price_usd_per_hour=20.0),
    "m1max": Host(name="m1max", profile="apple-m1-max", memory=64 * GiB),
}, None)

JOB = """\
name: t
model: {model}
data: {{sources: [{{path: d.txt, tokens: 1B}}], seq_len: 1024}}
train: {train}
budget: {{tokens: 100M}}
"""


def job(tmp_path: Path, train: str, model: str = "gpt2-124m", extra: str = ""):
    (tmp_path / "d.txt").write_text("x" * 1000)
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(model=model, train=train) + extra)
    return load_jobs(path)[0]


def test_two_gpus_double_the_global_batch_and_halve_the_steps(tmp_path):
    one = plan_job(job(tmp_path, "{batch_size: 8}"), "h100x2", inventory=INVENTORY)
    two = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2}"), "h100x2", inventory=INVENTORY)
    assert two.passes and two.gpus == 2
    assert two.stages[0].tokens_per_step(2) == 2 * one.stages[0].tokens_per_step(1) == 2 * 8 * 1024
    assert two.steps == 100_000_000 // (2 * 8 * 1024) and one.steps == 100_000_000 // (8 * 1024)
    assert two.tokens_per_s == pytest.approx(2 * one.tokens_per_s, rel=0.01)


def test_plan_picks_ddp_for_gpt2_124m_on_two_h100s_and_says_why(tmp_path):
    plan = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2}"), "h100x2", inventory=INVENTORY)
    assert plan.parallelism == "ddp"
    assert plan.parallelism_reason.startswith("DDP: a full copy of the model and its states fits one GPU")
    resolved = resolve(job(tmp_path, "{batch_size: 8, gpus: 2}"), "h100x2", plan, inventory=INVENTORY)
    assert (resolved.gpus, resolved.nodes, resolved.world_size, resolved.parallelism) == (2, 1, 2, "ddp")


def test_ddp_keeps_its_gradient_buckets_through_backward(tmp_path):
    single = plan_job(job(tmp_path, "{batch_size: 8}"), "h100x2", inventory=INVENTORY).memory
    ddp = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2}"), "h100x2", inventory=INVENTORY).memory
    assert single is not None and ddp is not None and ddp.gradient_buckets
    # one micro-batch per step: one GPU frees gradients between steps, DDP's buckets stay
    assert ddp.backward_peak_bytes - single.backward_peak_bytes == min(
        single.gradients_bytes, single.weight_copies_bytes + single.activations_bytes + single.logits_bytes)


def test_plan_picks_fsdp_for_a_7b_full_finetune_that_does_not_fit_one_h100(tmp_path):
    train = "{batch_size: 1, gpus: 8, gradient_checkpointing: true}"
    plan = plan_job(job(tmp_path, train, model="llama-7b"), "h100x8", inventory=INVENTORY)
    assert plan.parallelism == "fsdp" and plan.passes, plan.reasons
    assert plan.parallelism_reason.startswith("FSDP: a full copy per GPU (DDP) needs")
    assert "over 8 GPUs" in plan.parallelism_reason
    memory = plan.memory
    params = PRESETS["llama-7b"].param_count()
    assert memory.shards == 8 and memory.weights_bytes == -(-4 * params // 8)
    assert memory.optimizer_bytes == -(-8 * params // 8)
    ddp = plan_job(job(tmp_path, train.replace("}", ", parallelism: ddp}"), model="llama-7b"), "h100x8",
                   inventory=INVENTORY)
    assert not ddp.fits and any("short" in r for r in ddp.reasons)


def test_fsdp_divides_weights_gradients_and_states_and_adds_gathered_blocks():
    shape = PRESETS["llama-1b"]
    common = dict(seq_len=1024, micro_batch=2, precision="bf16", device="cuda", capacity_bytes=80 * GiB,
                  memory_bytes=80 * GiB, usable_share=1.0, runtime_bytes=0)
    one, four = estimate_memory(shape, **common), estimate_memory(shape, **common, shards=4)
    block = shape.non_embedding_params() // shape.layers
    assert four.weights_bytes == -(-one.weights_bytes // 4)
    assert four.optimizer_bytes == -(-one.optimizer_bytes // 4)
    assert four.gradients_bytes == -(-one.gradients_bytes // 4) + 4 * block
    assert four.activations_bytes == one.activations_bytes  # activations are per GPU either way
    assert four.peak_bytes < one.peak_bytes
    with pytest.raises(ValueError):
        estimate_memory(shape, **common, shards=4, lora=object())  # type: ignore[arg-type]


def test_plan_refuses_two_processes_on_a_cpu_host_unless_the_job_asks_for_the_gloo_test_path(tmp_path):
    refused = plan_job(job(tmp_path, "{batch_size: 2, gpus: 2}", model="tiny"), "local", inventory=INVENTORY)
    assert not refused.passes
    assert any("a CPU host has none" in r and "distributed_on_cpu" in r for r in refused.reasons)
    ok = plan_job(job(tmp_path, "{batch_size: 2, gpus: 2, distributed_on_cpu: true}", model="tiny"), "local",
                  inventory=INVENTORY)
    assert ok.passes, ok.reasons
    assert ok.parallelism == "ddp"


def test_plan_refuses_several_processes_on_apple_even_with_the_cpu_test_switch(tmp_path):
    plan = plan_job(job(tmp_path, "{batch_size: 2, gpus: 2, distributed_on_cpu: true}", model="tiny"), "m1max",
                    inventory=INVENTORY)
    assert not plan.passes
    assert any("Apple (MPS) host trains in one" in r for r in plan.reasons)


def test_plan_refuses_more_gpus_than_the_host_has(tmp_path):
    plan = plan_job(job(tmp_path, "{batch_size: 8, gpus: 4}"), "h100x2", inventory=INVENTORY)
    assert any("asks for 4 GPUs but h100x2 has 2" in r for r in plan.reasons)


def test_plan_refuses_fsdp_with_lora_and_with_fp16(tmp_path):
    lora = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2, parallelism: fsdp}", extra="lora: {rank: 8}\n"),
                    "h100x2", inventory=INVENTORY)
    assert any("fsdp is for full training" in r for r in lora.reasons)
    fp16 = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2, parallelism: fsdp, precision: fp16}"), "h100x2",
                    inventory=INVENTORY)
    assert any("FSDP trains in bf16 or fp32, not fp16" in r for r in fp16.reasons)
    auto_lora = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2}", extra="lora: {rank: 8}\n"), "h100x2",
                         inventory=INVENTORY)
    assert auto_lora.parallelism == "ddp" and "LoRA" in auto_lora.parallelism_reason


def test_two_nodes_pay_for_both_hosts_and_count_all_their_gpus(tmp_path):
    extra = "hosts: [h100x2, h100x2]\n"
    one = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2}", extra=extra), "h100x2", inventory=INVENTORY)
    two = plan_job(job(tmp_path, "{batch_size: 8, gpus: 2, nodes: 2}", extra=extra), "h100x2", inventory=INVENTORY)
    assert two.nodes == 2 and two.price_usd_per_hour == 2 * one.price_usd_per_hour
    assert two.stages[0].tokens_per_step(4) == 4 * 8 * 1024
    assert two.steps == 100_000_000 // (4 * 8 * 1024)


def test_job_with_more_nodes_than_listed_hosts_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(UserErrors) as caught:
        job(tmp_path, "{gpus: 2, nodes: 2}", extra="hosts: [h100x2]\n")
    text = str(caught.value)
    assert "train.nodes: 2 runs on the first 2 hosts of hosts:, which lists 1" in text
    assert "job.yaml:" in text


def test_one_process_runs_the_trainer_without_torchrun():
    assert trainer_argv("python", "run/resolved.json", "run") == [
        "python", "-m", "runner.trainer", "run/resolved.json", "--out", "run"]


def test_several_gpus_on_one_host_run_under_a_standalone_torchrun():
    assert trainer_argv("py", "r.json", "out", gpus=4) == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone",
        "-m", "runner.trainer", "r.json", "--out", "out"]


def test_each_host_of_a_multi_node_run_gets_its_rank_and_the_first_hosts_rendezvous():
    argvs = node_argvs("py", "r.json", "out", gpus=2, addresses=["10.0.0.1", "10.0.0.2"], port=29500)
    assert len(argvs) == 2
    for rank, argv in enumerate(argvs):
        assert argv[:4] == ["py", "-m", "torch.distributed.run", "--nproc-per-node=2"]
        assert {"--nnodes=2", f"--node-rank={rank}", "--rdzv-backend=static",
                "--rdzv-endpoint=10.0.0.1:29500"} <= set(argv)
        assert "--standalone" not in argv
        assert argv[-5:] == ["-m", "runner.trainer", "r.json", "--out", "out"]
    assert trainer_argv("py", "r.json", "out", rendezvous=Rendezvous("h", 2, 1))[3:5] == [
        "--nproc-per-node=1", "--nnodes=2"]

