"""KTransformersPlugin: environment and config file, precedence, validation, refused setups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType, patch_environment

from kt_accelerate import KTransformersPlugin
from kt_sft import KTConfig


def test_defaults() -> None:
    plugin = KTransformersPlugin()
    assert plugin.engine_placement == "per_node"
    assert plugin.dist_timeout is None and plugin.timeout == 1800
    assert plugin.allow_world_size_change is False
    assert isinstance(plugin.kt_config, KTConfig)
    assert plugin.kt_config.to_dict() == KTConfig().to_dict()


def test_kt_config_precedence_argument_then_accelerate_env_then_file_then_kt_env(tmp_path) -> None:
    cfg = tmp_path / "kt.yaml"
    cfg.write_text("kt_lora_rank: 4\nkt_num_threads: 1\n")
    with patch_environment(kt_lora_rank="8", kt_max_tokens="512"):
        assert KTransformersPlugin().kt_config.lora_rank == 8  # KT_* (kt-sft's own)
        with patch_environment(accelerate_kt_config_file=str(cfg)):
            plugin = KTransformersPlugin()
            assert plugin.kt_config.lora_rank == 4  # the file beats KT_*
            assert plugin.kt_config.max_tokens == 512  # KT_* fills what the file leaves
            assert plugin.config_file == str(cfg)
            with patch_environment(accelerate_kt_lora_rank="16"):
                assert KTransformersPlugin().kt_config.lora_rank == 16  # ACCELERATE_KT_*
                explicit = KTransformersPlugin(kt_config={"lora_rank": 2})
                assert explicit.kt_config.lora_rank == 2  # the argument beats everything
                assert explicit.kt_config.max_tokens == 512


def test_plugin_fields_precedence(tmp_path) -> None:
    cfg = tmp_path / "kt.json"
    cfg.write_text('{"engine_placement": "per_rank", "dist_timeout": 30, "lora_rank": 2}')
    with patch_environment(kt_engine_placement="per_node", kt_dist_timeout="99"):
        plugin = KTransformersPlugin()
        assert (plugin.engine_placement, plugin.dist_timeout) == ("per_node", 99.0)
        plugin = KTransformersPlugin(config_file=str(cfg))
        assert (plugin.engine_placement, plugin.dist_timeout) == ("per_rank", 30.0)
        assert plugin.kt_config.lora_rank == 2
        with patch_environment(
            accelerate_kt_dist_timeout="7", accelerate_kt_allow_world_size_change="yes"
        ):
            plugin = KTransformersPlugin(config_file=str(cfg))
            assert plugin.dist_timeout == 7.0 and plugin.allow_world_size_change is True
            plugin = KTransformersPlugin(
                config_file=str(cfg), dist_timeout=5, engine_placement="PER_NODE"
            )
            assert (plugin.engine_placement, plugin.dist_timeout) == ("per_node", 5.0)


def test_config_file_takes_llama_factory_names_and_a_kt_section(tmp_path) -> None:
    cfg = tmp_path / "kt.yaml"
    cfg.write_text(
        "kt:\n  kt_backend: AMXInt8\n  kt_lora_rank: 16\n  kt_max_seq_len: 1024\n"
        "  engine_placement: per_rank\n"
    )
    plugin = KTransformersPlugin(config_file=str(cfg))
    assert plugin.kt_config.isa == "amx" and plugin.kt_config.weight_dtype == "int8"
    assert plugin.kt_config.lora_rank == 16 and plugin.kt_config.max_tokens == 1024
    assert plugin.engine_placement == "per_rank"
    assert plugin.explicit_kt_settings["lora_rank"] == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"engine_placement": "everywhere"},
            r"KTransformersPlugin\.engine_placement must be one "
            r"of per_node, per_rank; got 'everywhere'",
        ),
        ({"dist_timeout": "soon"}, r"KTransformersPlugin\.dist_timeout must be a number"),
        ({"dist_timeout": 0}, r"KTransformersPlugin\.dist_timeout must be > 0"),
        (
            {"allow_world_size_change": "maybe"},
            r"KTransformersPlugin\.allow_world_size_change must be a boolean",
        ),
        (
            {"kt_config": {"kt_lora_rnk": 4}},
            r"KTransformersPlugin\.kt_config: unknown KTConfig key 'kt_lora_rnk'",
        ),
        ({"kt_config": {"lora_rank": -1}}, r"KTransformersPlugin\.kt_config: lora_rank must be"),
        ({"kt_config": 42}, r"KTransformersPlugin\.kt_config must be a KTConfig, a mapping"),
        (
            {"config_file": "/nonexistent/kt.yaml"},
            r"KTransformersPlugin\.config_file: '/nonexistent/kt.yaml' does not exist",
        ),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KTransformersPlugin(**kwargs)


def test_invalid_environment_values_name_the_field() -> None:
    with (
        patch_environment(accelerate_kt_engine_placement="nowhere"),
        pytest.raises(ValueError, match=r"engine_placement .*'nowhere'"),
    ):
        KTransformersPlugin()
    with (
        patch_environment(accelerate_kt_lora_rank="many"),
        pytest.raises(ValueError, match=r"kt_config: lora_rank must be an integer"),
    ):
        KTransformersPlugin()


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "MULTI_GPU", DistributedType.MULTI_GPU])
def test_supported_distributed_types(kind) -> None:
    KTransformersPlugin().check_distributed_type(kind)


def test_deepspeed_zero3_is_refused_naming_the_alternative() -> None:
    plugin = KTransformersPlugin()
    with pytest.raises(
        ValueError,
        match=r"DeepSpeed ZeRO-3 is not supported.*use DDP instead"
        r": `distributed_type: MULTI_GPU`",
    ):
        plugin.check_distributed_type(DistributedType.DEEPSPEED, zero_stage=3)
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-2 is not supported.*use DDP"):
        plugin.check_distributed_type("DEEPSPEED", zero_stage=2)
    # As `accelerate launch --use_deepspeed --zero_stage 3` exports it.
    with (
        patch_environment(accelerate_use_deepspeed="true", accelerate_deepspeed_zero_stage="3"),
        pytest.raises(ValueError, match="DeepSpeed ZeRO-3 is not supported"),
    ):
        KTransformersPlugin()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            DistributedType.FSDP,
            r"FSDP version 1 \(FullyShardedDataParallel\) is not supported.*"
            r"use FSDP2 \(`distributed_type: FSDP` with `fsdp_config: "
            r"\{fsdp_version: 2\}`",
        ),
        (DistributedType.XLA, "distributed type XLA is not supported"),
        ("MEGATRON_LM", "distributed type MEGATRON_LM is not supported"),
    ],
)
def test_other_unsupported_distributed_types(kind, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KTransformersPlugin().check_distributed_type(kind)


def test_fsdp2_is_supported() -> None:
    plugin = KTransformersPlugin()
    plugin.check_distributed_type(DistributedType.FSDP, fsdp_version=2)
    plugin.check_distributed_type("FSDP", fsdp_version=2)


def _fsdp2(**kw):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, **kw)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _fsdp2(), None),
        (lambda: SimpleNamespace(fsdp_version=1), r"FSDP version 1 .* use FSDP2"),
        (
            lambda: _fsdp2(cpu_offload=True),
            r"FSDP2 CPU offload .* is not supported with kt: .* would mix devices",
        ),
        (
            lambda: _fsdp2(cpu_ram_efficient_loading=True),
            r"FSDP2 `cpu_ram_efficient_loading` is not supported with kt: .*set "
            r"cpu_ram_efficient_loading=False",
        ),
        (
            lambda: _fsdp2(activation_checkpointing=True),
            r"FSDP2 `activation_checkpointing` .* would write an empty adapter.*"
            r"gradient_checkpointing_enable",
        ),
    ],
)
def test_fsdp_plugin_settings(make, message: str | None) -> None:
    plugin = KTransformersPlugin()
    if message is None:
        plugin.check_fsdp_plugin(make())
        return
    with pytest.raises(ValueError, match=message):
        plugin.check_fsdp_plugin(make())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"fsdp_version": "1"}, "FSDP version 1"),
        ({"fsdp_version": "2", "fsdp_offload_params": "true"}, "FSDP2 CPU offload"),
        (
            {"fsdp_version": "2", "fsdp_cpu_ram_efficient_loading": "true"},
            "cpu_ram_efficient_loading",
        ),
        (
            {"fsdp_version": "2", "fsdp_activation_checkpointing": "true"},
            "activation_checkpointing",
        ),
    ],
)
def test_fsdp_launch_environment_is_checked(env: dict, message: str) -> None:
    """As `accelerate launch` with an FSDP config exports it."""
    with (
        patch_environment(accelerate_use_fsdp="true", **env),
        pytest.raises(ValueError, match=message),
    ):
        KTransformersPlugin()
    with patch_environment(accelerate_use_fsdp="true", fsdp_version="2"):
        KTransformersPlugin()
    # An Accelerator given a plugin sets ACCELERATE_USE_FSDP in its own process (no
    # FSDP_VERSION): the accelerator checks its plugin itself, later plugins are not refused.
    with patch_environment(accelerate_use_fsdp="true"):
        KTransformersPlugin()


def _args(**kw) -> SimpleNamespace:
    base = {
        "deepspeed": None,
        "fsdp": "",
        "torch_compile": False,
        "use_cpu": False,
        "ddp_timeout": 1800,
    }
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    ("plugin_kwargs", "args", "message"),
    [
        ({}, _args(deepspeed={"zero_optimization": {"stage": 3}}), "DeepSpeed ZeRO-3"),
        (
            {},
            _args(fsdp="full_shard", fsdp_plugin_args={"fsdp_version": 1}),
            r"FSDP version 1 .* use FSDP2",
        ),
        (
            {},
            _args(
                fsdp="full_shard offload", fsdp_plugin_args={"fsdp_version": 2, "cpu_offload": True}
            ),
            "FSDP2 CPU offload",
        ),
        ({}, _args(torch_compile=True), r"TrainingArguments\.torch_compile=True conflicts"),
        (
            {"kt_config": {"num_gpu_experts": 2}},
            _args(use_cpu=True),
            r"TrainingArguments\.use_cpu=True conflicts with KTransformersPlugin\.kt_config\."
            r"num_gpu_experts=2",
        ),
        (
            {"dist_timeout": 3600},
            _args(ddp_timeout=1800),
            r"dist_timeout=3600s is longer than TrainingArguments\.ddp_timeout=1800s",
        ),
    ],
)
def test_conflicts_with_training_arguments(plugin_kwargs: dict, args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KTransformersPlugin(**plugin_kwargs).check_training_args(args)


def test_compatible_training_arguments_pass() -> None:
    plugin = KTransformersPlugin(dist_timeout=60)
    plugin.check_training_args(_args(use_cpu=True, ddp_timeout=120))
    assert plugin.to_dict()["dist_timeout"] == 60
