"""What the training data is and how it is read, validated (the `data:` section of a run config)."""

from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SourceSpec(BaseModel):
    """One data source: a file, glob, folder, `pkg://package/relative/glob`, or a `datasets` hub name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(..., min_length=1)
    weight: float = Field(1.0, gt=0, description="relative sampling weight when several sources are mixed")
    text_field: Optional[str] = Field(None, description="overrides data.text_field for this source")
    name: Optional[str] = Field(None, description="`datasets` config name, for hub sources")
    split: str = Field("train", description="`datasets` split, for hub sources")
    revision: Optional[str] = Field(None, min_length=1, description="the hub dataset's revision (a commit sha or "
                                    "tag): pins what a hub source reads, so that a resume or a cached stream reads "
                                    "the same version (recorded in every checkpoint)")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sources: List[SourceSpec] = Field(default_factory=list, description="where the text comes from")
    text_field: str = Field("text", min_length=1, description="column/key holding the text in JSONL and Parquet")
    text_split: Literal["document", "paragraph", "line"] = Field(
        "document", description="how a plain-text file is cut into documents (EOS goes between documents)"
    )
    tokenizer: str = Field("gpt2", min_length=1, description="'gpt2', a tokenizer.json, or a folder with vocab+merges")
    shuffle_buffer: int = Field(1000, ge=0, description="documents per deterministic shuffle block; 0 keeps source "
                                "order")
    window_shuffle: int = Field(16384, ge=0, description="packed windows per shuffled span: the windows of each span "
                                "of the stream are permuted (seeded by train.seed), so a batch draws from across the "
                                "span; costs window_shuffle x (seq_len+1) x 4 bytes per rank; 0 or 1 keeps stream "
                                "order")
    workers: int = Field(0, ge=0, description="tokenizing worker processes; 0 tokenizes in a background thread")
    prefetch: int = Field(4, ge=1, description="micro-batches prepared ahead of the trainer")
    on_bad_file: Literal["fail", "skip"] = Field("fail", description="a non-UTF-8 or unreadable file: stop, or skip "
                                                 "it with a warning")
    cache: str = Field("run", min_length=1, description="token cache: 'run' (RUN_DIR/token_cache), 'off' (every rank "
                                                        "tokenizes what it reads), or a folder shared by runs")
    hub_retries: int = Field(5, ge=0, description="transient errors streaming a hub dataset retried this many times "
                                                  "in a row (waits double from hub_backoff_s) before the run stops")
    hub_backoff_s: float = Field(2.0, ge=0, description="seconds before the first retry of a hub stream")
    cache_scope: Literal["job", "node"] = Field(
        "job", description="who shares the tokenizing: the whole job (the cache folder is on a filesystem all nodes "
                           "see) or each node")

    @field_validator("cache", mode="before")
    @classmethod
    def _off_is_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("sources", mode="before")
    @classmethod
    def _accept_short_forms(cls, value: object) -> object:
        return source_list(value)


def source_list(value: object) -> object:
    """`sources: data/*.txt` and `sources: [a.jsonl, {path: b.jsonl, weight: 2}]` both become a list of specs."""
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value
