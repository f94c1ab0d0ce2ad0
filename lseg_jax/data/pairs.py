"""Training on (support, query) episodes, as the official zero-shot training.

LSeg's zero-shot module trains on HSNet's FSSDataset built with shot=1: each
episode is a query record and one support image of the query's class, drawn
at random among the class's images and redrawn when it is the query's own
image (`sample_episode`); `training_step` then concatenates the supports and
the queries, so a step of `bsz` episodes trains on 2 x bsz images, each with
its episode's label pair. One epoch is one episode per training record
(`__len__` of the "trn" split is the number of records).

Here the global training order of query records (shuffled every epoch, as
the pipeline orders any dataset) becomes [support_0, query_0, support_1,
query_1, ...]: a global batch of B images (B even) holds B / 2 whole
episodes, whatever the number of processes. The support of the episode at
global position p is drawn with a numpy Generator seeded by (seed, p), so
the order is reproducible and an iterator restored from its checkpointed
position yields the same pairs.
"""

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np


class SupportPools:
  """The records of every class, to draw supports from.

  classes: [n] class of each record; names: [n] the image each record comes
  from (a support never shares the query's image). Raises a ValueError
  naming the class when a class has a single image: no episode could be
  formed for its records (HSNet's loop would spin forever).
  """

  def __init__(self, classes: np.ndarray, names: np.ndarray, dataset: str):
    self._classes = np.asarray(classes).astype(np.int64)
    self._names = np.asarray(names)
    if self._classes.shape != self._names.shape or self._classes.ndim != 1:
      raise ValueError(f"{dataset}: expected one class and one name per record, got shapes "
                       f"{self._classes.shape} and {self._names.shape}")
    order = np.argsort(self._classes, kind="stable")
    ids, starts = np.unique(self._classes[order], return_index=True)
    self._pools = dict(zip(ids.tolist(), np.split(order, starts[1:])))
    for c, pool in self._pools.items():
      if len(np.unique(self._names[pool])) < 2:
        name = self._names[pool[0]]
        name = name.decode() if isinstance(name, bytes) else str(name)  # TFDS text is bytes
        raise ValueError(f"{dataset}: class {c} has a single training image ({name!r}); "
                         "an episode needs a support image of the query's class besides the query.")

  def draw(self, query: int, rng: np.random.Generator) -> int:
    """A record of the query's class from another image, uniform over the
    class's records (redrawn on the query's image, as HSNet)."""
    pool = self._pools[int(self._classes[query])]
    while True:
      support = int(pool[rng.integers(len(pool))])
      if self._names[support] != self._names[query]:
        return support


class SupportQueryPairs(grain.MapDataset):
  """Records [support_0, query_0, support_1, query_1, ...] of `source`.

  parent: a MapDataset of query record indices (already shuffled); index i
  of this dataset is episode i // 2 of the parent, its support when i is
  even. Indices past one epoch are passed on, so a shuffling parent
  reshuffles each epoch when a `repeat` follows this dataset.
  """

  def __init__(self, parent: grain.MapDataset, source: Sequence[Any], pools: SupportPools, seed: int):
    super().__init__(parent)
    self._source, self._pools, self._seed = source, pools, seed

  def __len__(self) -> int:
    return 2 * len(self._parents[0])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    episode, is_query = divmod(index, 2)
    query = int(self._parents[0][episode])
    if is_query:
      return self._source[query]
    return self._source[self._pools.draw(query, np.random.default_rng((self._seed, episode)))]


def episode_order(source: Sequence[Any], pools: SupportPools, *, global_batch_size: int, seed: int,
                  num_epochs: int | None, dataset: str) -> grain.MapDataset:
  """The global training order of raw records, support before query, in
  whole global batches of `global_batch_size` images (2 per episode).

  Each epoch takes the first len(source) // (B / 2) * (B / 2) records as
  queries, shuffled anew; `num_epochs` None = forever.
  """
  if global_batch_size % 2:
    raise ValueError(f"{dataset}: the batch size counts images, 2 per training episode (support and query); "
                     f"it must be even, got {global_batch_size}.")
  episodes = global_batch_size // 2
  n = len(source) // episodes * episodes
  if n == 0:
    raise ValueError(f"{dataset}: {len(source)} training records cannot fill a batch of {episodes} episodes.")
  queries = grain.MapDataset.range(n).shuffle(seed=seed)
  return SupportQueryPairs(queries, source, pools, seed).repeat(num_epochs)
