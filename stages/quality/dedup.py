"""Near-duplicate photos across the whole dataset, from the quality stage's CLIP image embeddings (as SemDeDup and
NeMo Curator find them): spherical k-means into clusters, then every pair within a cluster compared.

Consumes  <root>/quality/shard-NNNNNN.parquet  (key, embedding) of every scored shard
Produces  <root>/quality/near_duplicates.parquet  one row per sample that has an earlier sample (in shard and key
          order) of its cluster at cosine >= FLOOR: shard, key, duplicate_of (the most similar earlier key), cosine

A sample is a near-duplicate at threshold t (quality.dedup) when its cosine to some earlier sample is at least t; so
the first of each group is kept, the decision is the same on every rerun, and any t >= FLOOR needs no
recomputation. Pairs split across two clusters are missed, as in SemDeDup; more samples per cluster miss fewer.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.files import atomic_path
from core.storage import read_parquet
from stages.dataset.shards import DatasetLayout

FLOOR = 0.8  # the lowest cosine recorded: quality.dedup may be set anywhere above it without recomputing
TABLE = "near_duplicates.parquet"
SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("duplicate_of", pa.string()),
                    ("cosine", pa.float32())])


def spherical_kmeans(x, clusters: int, iterations: int = 10, seed: int = 0):
    """Cluster ids of unit vectors (torch, N x d, float16 or float32: computed in float32 a chunk at a time) by
    cosine: seeded, so the same on every run."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=generator)[:clusters].to(x.device)].float()
    assign = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(iterations):
        sums, parts = torch.zeros_like(centroids), []
        for chunk in x.split(65536):
            chunk = chunk.float()
            parts.append((chunk @ centroids.T).argmax(1))
            sums.index_add_(0, parts[-1], chunk)
        assign = torch.cat(parts)
        empty = sums.norm(dim=1) == 0  # a cluster that lost every member keeps its centroid
        centroids = torch.where(empty[:, None], centroids, torch.nn.functional.normalize(sums, dim=1))
    return assign


def earlier_neighbours(x, assign) -> tuple[np.ndarray, np.ndarray]:
    """For each vector (in the order given): the most similar earlier vector of its cluster and their cosine
    (-1 and -inf where none)."""
    import torch

    nearest = np.full(len(x), -1, dtype=np.int64)
    cosine = np.full(len(x), -np.inf, dtype=np.float32)
    order = torch.argsort(assign, stable=True)  # each cluster's members stay in the given order
    bounds = torch.searchsorted(assign[order], torch.arange(int(assign.max()) + 2, device=assign.device)).tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start < 2:
            continue
        members = order[start:stop]
        vectors = x[members].float()
        similarity = vectors @ vectors.T
        similarity = similarity.masked_fill(~torch.ones_like(similarity, dtype=torch.bool).tril(-1), -float("inf"))
        best, at = similarity.max(dim=1)
        members = members.cpu().numpy()
        nearest[members] = members[at.cpu().numpy()]
        cosine[members] = best.float().cpu().numpy()
    nearest[~np.isfinite(cosine)] = -1
    return nearest, cosine


def find_near_duplicates(root, shards: list[str], cluster_size: int = 1000, device: str = "cpu") -> dict:
    """Compare every scored shard's embeddings; write the near-duplicate table; its figures."""
    import torch

    layout = DatasetLayout(root)
    keys, where, parts = [], [], []
    for shard in shards:
        table = read_parquet(layout.table("quality", shard), ["key", "embedding"])
        keys += table["key"].to_pylist()
        where += [shard] * table.num_rows
        if table.num_rows:
            flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(table.num_rows, -1))
    rows = []
    if parts:
        x = torch.from_numpy(np.concatenate(parts)).to(device)  # float16 as stored: 2 bytes a dimension
        assign = spherical_kmeans(x, max(1, len(x) // cluster_size))
        nearest, cosine = earlier_neighbours(x, assign)
        rows = [(where[i], keys[i], keys[nearest[i]], float(cosine[i])) for i in np.flatnonzero(cosine >= FLOOR)]
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(SCHEMA.names)}, schema=SCHEMA)
    with atomic_path(table_path(layout)) as tmp:  # sorted by shard: a shard's rows are a few row groups
        pq.write_table(table.replace_schema_metadata({"shards": ",".join(shards)}), tmp, row_group_size=65536)
    return {"samples": len(keys), "pairs": len(rows)}


def table_path(layout: DatasetLayout):
    return layout.root / "quality" / TABLE


def covered_shards(layout: DatasetLayout) -> list[str] | None:
    """The shards the near-duplicate table was computed over (None where there is none)."""
    if not table_path(layout).is_file():
        return None
    metadata = read_parquet(table_path(layout), ["shard"]).schema.metadata or {}
    return [s for s in metadata.get(b"shards", b"").decode().split(",") if s]


def near_duplicates_in(layout: DatasetLayout, shard: str) -> dict[str, tuple[str, float]]:
    """key -> (the most similar earlier key, cosine) for one shard's samples in the table."""
    table = read_parquet(table_path(layout), filters=[("shard", "==", shard)]).to_pydict()
    return {k: (d, c) for k, d, c in zip(table["key"], table["duplicate_of"], table["cosine"])}
