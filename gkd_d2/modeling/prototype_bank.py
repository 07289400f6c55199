"""The prototype bank: the PGM's prototypes of every (level, class) (paper section 3.2), which
instances of the PGM sample they are, and the refresh that picked them."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PrototypeBank(nn.Module):
    """Up to M prototypes per (level, class), each a sampled instance with its student and
    teacher features; the instance sample they were picked from; the refresh that picked them.

    Fixed-shape buffers, so that the bank is in every checkpoint and loads strictly:
    ``protos_s`` (L, K, M, C_S), ``protos_t`` (L, K, M, C_T), ``proto_counts`` (L, K) the valid
    prototypes of each (level, class), ``proto_index`` (L, K, M) int64 the row of each prototype
    in :attr:`instances` (-1: an empty slot, or an unknown instance: a bank set without an
    index, a checkpoint saved before the index existed), ``bank_iter`` the training iteration
    whose refresh produced the bank (-1: none yet).

    :attr:`instances` is the PGM's instance sample (``image`` (N,), ``cls`` (N,), ``box``
    (N, 4); None until the first refresh draws it). Its size varies, so it is no buffer: the
    refresh hook saves it with its own checkpoint state (``instances``), as GKD always has.

    :class:`~gkd_d2.modeling.GKDDistiller` is a bank (rather than holding one), so that these
    buffers keep the names checkpoints and tools know (``distiller.proto_index``, ...).
    """

    def __init__(
        self,
        num_levels: int,
        num_classes: int,
        num_prototypes: int,
        student_channels: int,
        teacher_channels: int,
    ):
        super().__init__()
        L, K, M = num_levels, num_classes, num_prototypes
        self.register_buffer("protos_s", torch.zeros(L, K, M, student_channels))
        self.register_buffer("protos_t", torch.zeros(L, K, M, teacher_channels))
        self.register_buffer("proto_counts", torch.zeros(L, K, dtype=torch.long))
        self.register_buffer("proto_index", torch.full((L, K, M), -1, dtype=torch.long))
        self.register_buffer("bank_iter", torch.tensor(-1, dtype=torch.long))
        self.instances: dict[str, Tensor] | None = None

    @property
    def num_levels(self) -> int:
        return self.protos_s.shape[0]

    @property
    def num_classes(self) -> int:
        return self.protos_s.shape[1]

    @torch.no_grad()
    def set_bank(
        self,
        level: int,
        cls: int,
        feats_s: Tensor,
        feats_t: Tensor,
        index: Tensor | None = None,
    ) -> None:
        """Store the prototypes of one (level, class).

        Args:
            level, cls: the slot.
            feats_s, feats_t: (m, C_S) / (m, C_T) prototype features, m <= M.
            index: optional (m,) int64 row of each prototype in the PGM instance sample (what
                the pictures of ``tools/visualize_prototypes.py`` show); None stores -1.
        """
        m = feats_s.shape[0]
        if index is not None and index.shape != (m,):
            raise ValueError(f"set_bank: {m} prototypes but an index of shape {tuple(index.shape)}")
        self.protos_s[level, cls].zero_()
        self.protos_t[level, cls].zero_()
        self.proto_index[level, cls].fill_(-1)
        self.protos_s[level, cls, :m] = feats_s
        self.protos_t[level, cls, :m] = feats_t
        if index is not None:
            self.proto_index[level, cls, :m] = index.to(self.proto_index)
        self.proto_counts[level, cls] = m

    @torch.no_grad()
    def store_picks(
        self,
        picked: list[list[Tensor]],
        feats_s: list[Tensor],
        feats_t: list[Tensor],
        iteration: int,
    ) -> None:
        """Replace the whole bank with the picks of the refresh at ``iteration``.

        Args:
            picked: picked[c][level], the (m,) int64 sample rows picked for (class, level).
            feats_s, feats_t: per level, (N, C_S) / (N, C_T) features of the whole sample.
        """
        device = self.protos_s.device
        for c in range(self.num_classes):
            for lvl in range(self.num_levels):
                picks = picked[c][lvl]
                self.set_bank(
                    lvl, c, feats_s[lvl][picks].to(device), feats_t[lvl][picks].to(device), picks
                )
        self.bank_iter.fill_(iteration)

    def bank(self, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """Valid prototypes of a level: (P, C_S), (P, C_T) in class blocks, starts (K + 1,)."""
        counts = self.proto_counts[level]
        M = self.protos_s.shape[2]
        valid = torch.arange(M, device=counts.device)[None, :] < counts[:, None]  # (K, M)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self.protos_s[level][valid], self.protos_t[level][valid], starts

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints saved before proto_index existed still load (strictly too): their
        # prototypes are real, only which instances they are is unknown (-1)
        key = prefix + "proto_index"
        if key not in state_dict and prefix + "protos_s" in state_dict:
            state_dict[key] = torch.full_like(self.proto_index, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
