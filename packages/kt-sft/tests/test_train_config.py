"""The `kt-sft train` configuration schema: every key validated, clear messages."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kt_sft.train.schema import (
    EMBEDDED,
    ConfigError,
    TrainConfig,
    embedded_defaults,
    load_train_config,
    parse_overrides,
)


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _base(**extra: object) -> dict:
    return {"model_name_or_path": EMBEDDED, "dataset": EMBEDDED, **extra}


def test_embedded_defaults_are_a_valid_config() -> None:
    cfg = load_train_config(None)
    assert cfg.model_name_or_path == EMBEDDED and cfg.datasets == [EMBEDDED]
    assert cfg.max_steps > 0 and cfg.learning_rate > 0
    assert set(embedded_defaults()) <= set(cfg.to_dict())


def test_defaults_and_derived_values() -> None:
    cfg = TrainConfig.from_dict(_base(lora_rank=4))
    assert cfg.scaling_alpha == 8.0  # 2 x rank by default
    assert cfg.lora_targets == ["all"]
    assert TrainConfig.from_dict(_base(lora_target="q_proj, v_proj,experts")).lora_targets == [
        "q_proj",
        "v_proj",
        "experts",
    ]


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        """
        model_name_or_path: embedded
        dataset: embedded
        lerning_rate: 1.0e-4
    """,
    )
    with pytest.raises(
        ConfigError, match=r"unknown key 'lerning_rate'.*did you mean 'learning_rate'"
    ):
        load_train_config(path)


def test_unknown_key_without_close_match_points_to_docs() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'zzzqqq'.*docs/configuration.md"):
        TrainConfig.from_dict(_base(zzzqqq=1))


def test_unknown_kt_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"kt_num_thread.*did you mean 'kt_num_threads'"):
        TrainConfig.from_dict(_base(kt_num_thread=2))


def test_kt_keys_are_validated_by_ktconfig() -> None:
    cfg = TrainConfig.from_dict(_base(kt_num_threads=1, kt_weight_dtype="bf16"))
    assert cfg.kt == {"kt_num_threads": 1, "kt_weight_dtype": "bf16"}
    with pytest.raises(ConfigError, match="weight_dtype"):
        TrainConfig.from_dict(_base(kt_weight_dtype="fp7"))
    nested = TrainConfig.from_dict(_base(kt={"num_threads": 1}))
    assert nested.kt == {"kt_num_threads": 1}


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("lora_rank", "eight", r"'lora_rank' must be an integer, got 'eight'"),
        ("lora_rank", 0, r"'lora_rank' must be >= 1"),
        ("lora_rank", True, r"'lora_rank' must be an integer"),
        ("learning_rate", "fast", r"'learning_rate' must be a number"),
        ("learning_rate", 0, r"'learning_rate' must be > 0"),
        ("warmup_ratio", 1.5, r"'warmup_ratio' must be <= 1"),
        ("gradient_checkpointing", "maybe", r"'gradient_checkpointing' must be true or false"),
        ("lr_scheduler_type", "cosin", r"must be one of cosine, .*did you mean 'cosine'"),
        ("dataset_format", "chat", r"'dataset_format' must be one of"),
        ("dataset", [], r"'dataset' must be a non-empty string or list"),
        ("max_steps", 0, r"'max_steps' must be > 0, or -1"),
        ("output_dir", {"a": 1}, r"'output_dir' must be a string"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig.from_dict(_base(**{key: value}))


def test_strings_are_typed() -> None:
    cfg = TrainConfig.from_dict(
        _base(
            learning_rate="1e-4",
            lora_rank="16",
            bf16="yes",
            max_samples="null",
            num_train_epochs="2",
        )
    )
    assert cfg.learning_rate == 1e-4 and cfg.lora_rank == 16 and cfg.bf16 is True
    assert cfg.max_samples is None and cfg.num_train_epochs == 2.0


def test_aliases_from_trl_and_llama_factory() -> None:
    cfg = TrainConfig.from_dict(
        _base(
            max_seq_length=256,
            lr=3e-4,
            r=4,
            batch_size=2,
            completion_only_loss=False,
            dataset_text_field="body",
        )
    )
    assert (cfg.cutoff_len, cfg.learning_rate, cfg.lora_rank) == (256, 3e-4, 4)
    assert cfg.per_device_train_batch_size == 2 and cfg.text_column == "body"
    assert cfg.train_on_prompt is True  # completion_only_loss is the negation
    with pytest.raises(ConfigError, match="'max_length' and 'cutoff_len' both set 'cutoff_len'"):
        TrainConfig.from_dict(_base(cutoff_len=1, max_length=2))


def test_missing_model_path(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "dataset: data.jsonl\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"missing model path: set 'model_name_or_path'"):
        load_train_config(path)


def test_missing_dataset(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model_name_or_path: embedded\n")
    with pytest.raises(ConfigError, match=r"missing dataset: set 'dataset'"):
        load_train_config(path)


def test_yaml_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(_yaml(tmp_path, "a: [1, 2\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_train_config(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))


def test_command_line_overrides(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        """
        model: embedded
        dataset: embedded
        max_seq_length: 64
        lora_rank: 4
    """,
    )
    cfg = load_train_config(
        path,
        [
            "--cutoff_len",
            "32",
            "--lora-rank=8",
            "--gradient_checkpointing",
            "--lora_target",
            "q_proj,experts",
            "--output_dir",
            "x",
        ],
    )
    assert cfg.cutoff_len == 32  # replaces the file's max_seq_length spelling
    assert cfg.lora_rank == 8 and cfg.gradient_checkpointing is True
    assert cfg.lora_targets == ["q_proj", "experts"] and cfg.output_dir == "x"
    with pytest.raises(ConfigError, match=r"unknown key 'lora_rnk'.*'lora_rank'"):
        load_train_config(path, ["--lora_rnk", "3"])
    with pytest.raises(ConfigError, match="expected --key value"):
        parse_overrides(["stray"])


def test_relative_paths_resolve_next_to_the_yaml(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.jsonl").write_text('{"text": "x"}\n')
    path = _yaml(tmp_path / "conf", "model_name_or_path: embedded\ndataset: train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(path)
    assert Path(cfg.datasets[0]) == tmp_path / "conf" / "train.jsonl"


def test_print_config_round_trips(tmp_path: Path, capsys) -> None:
    from kt_sft.cli import main

    assert main(["train", "--print-config", "--max_steps", "7", "--kt_num_threads", "1"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    cfg = load_train_config(path)
    assert cfg.max_steps == 7 and cfg.kt == {"kt_num_threads": 1}
    assert (
        cfg.to_dict()
        == load_train_config(None, ["--max_steps", "7", "--kt_num_threads", "1"]).to_dict()
    )
