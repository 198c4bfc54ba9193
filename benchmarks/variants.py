"""Named sets of sync variants, as recipe overrides on top of ``recipes/quickstart.yaml``.

Shared by ``accuracy_study.py`` (accuracy over seeds on loopback) and
``multinode/tta_cifar.py`` (time to accuracy over an emulated slow link), so both compare
the same settings. Post-local variants take their switch point from the caller's schedule.
"""

from __future__ import annotations

MINIBATCH = ["sync.algorithm=minibatch", "sync.period=1", "sync.switch_epoch=null"]
POST_LOCAL_H16 = ["sync.algorithm=post_local", "sync.period=16"]
LOCAL = ["sync.algorithm=local", "sync.switch_epoch=null"]
COMPRESSION = {
    "none": [],
    "bf16": ["sync.compression.method=bf16"],
    "sign": ["sync.compression.method=sign"],
    "ef_sign": ["sync.compression.method=ef_sign"],
    "topk": ["sync.compression.method=topk", "sync.compression.ratio=0.01",
             "sync.compression.error_feedback=true"],
    "randomk": ["sync.compression.method=randomk", "sync.compression.ratio=0.25"],
    "qsgd": ["sync.compression.method=qsgd", "sync.compression.levels=4"],
}

DILOCO_H8 = [*LOCAL, "sync.period=8", "optim.name=adamw", "optim.base_lr=0.001",
             "optim.weight_decay=0.01", "optim.grad_clip=1.0", "sync.update=outer",
             "sync.outer.scale_by_inner_lr=false"]

PRESETS: dict[str, dict[str, list[str]]] = {
    # The paper's comparison.
    "paper": {"minibatch": MINIBATCH, "post_local": POST_LOCAL_H16},
    # Overlapped averaging (sync.overlap_steps = tau) against blocking, post-local H=8.
    "overlap": {f"tau{t}": [f"sync.overlap_steps={t}"] for t in (0, 1, 4, 8)},
    # Outer optimizers and the QSR period rule against plain post-local and mini-batch SGD.
    "outer": {
        "minibatch": MINIBATCH,
        "post_local_h16": POST_LOCAL_H16,
        "slowmo": [*POST_LOCAL_H16, "sync.update=outer", "sync.outer.momentum=0.5"],
        "diloco": [*POST_LOCAL_H16, "optim.name=adamw", "optim.base_lr=0.001",
                   "optim.weight_decay=0.01", "sync.update=outer", "sync.outer.lr=0.7",
                   "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
                   "sync.outer.scale_by_inner_lr=false"],
        # H = max(16, (0.8 / lr)^2): 16 at the 2-worker peak LR of 0.2, 1600 after decay.
        "qsr": [*POST_LOCAL_H16, "sync.period_rule=qsr", "sync.qsr_alpha=0.8"],
    },
    # Compressed communication (sync.compression): gradients of mini-batch SGD ("mb_"),
    # model deltas of local SGD with H=16 from the first step ("h16_"), and PyTorch's
    # PowerSGD hook (rank 1 and 2) as the peer of compressed mini-batch SGD.
    "compression": {
        **{f"{group}_{name}": [*base, *method]
           for group, base in (("mb", MINIBATCH), ("h16", [*LOCAL, "sync.period=16"]))
           for name, method in COMPRESSION.items()},
        # The paper's placement: local SGD with H=1 compresses each step's update (after
        # momentum and weight decay, momentum kept per worker), as its ef_sign_sgd does.
        "h1_ef_sign": [*LOCAL, "sync.period=1", *COMPRESSION["ef_sign"]],
        "powersgd_r1": ["entry=benchmarks/powersgd_entry.py", "--powersgd-rank=1"],
        "powersgd_r2": ["entry=benchmarks/powersgd_entry.py", "--powersgd-rank=2"],
    },
    # SparseLoCo against uncompressed DiLoCo on the same schedule: inner AdamW, local SGD
    # with H=8 from the first step (39 syncs in the quickstart's 312 steps, so error feedback
    # has syncs to act over), gradients clipped to norm 1 in both.
    "sparseloco": {
        "diloco": [*DILOCO_H8, "sync.outer.lr=0.7", "sync.outer.momentum=0.9",
                   "sync.outer.nesterov=true"],
        "sparseloco": [*DILOCO_H8, "sync.outer.lr=1.0", "sync.outer.momentum=0.0",
                       "sync.outer.nesterov=false", "sync.average_buffers=false",
                       "sync.compression.method=chunk_topk", "sync.compression.chunk=4096",
                       "sync.compression.ratio=0.015625", "sync.compression.bits=2",
                       "sync.compression.error_feedback=true",
                       "sync.compression.feedback_decay=0.95"],
    },
    # Gossip on a ring against all-reduce averaging, local SGD from the first step; the
    # measured variant adds one exact all-reduce per sync to log the consensus distance.
    "gossip": {
        "minibatch": MINIBATCH,
        "complete_h4": [*LOCAL, "sync.period=4"],
        "ring_h4": [*LOCAL, "sync.period=4", "sync.topology=ring"],
        "ring_h1": [*LOCAL, "sync.period=1", "sync.topology=ring"],
        "ring_h4_measured": [*LOCAL, "sync.period=4", "sync.topology=ring",
                             "sync.consensus_every=1"],
        # CHOCO-SGD: scaled signs of the difference to the public copies, gamma 0.5.
        "choco_sign_h1": [*LOCAL, "sync.period=1", "sync.topology=ring", "sync.reducer=choco",
                          "sync.compression.method=sign", "sync.choco.gamma=0.5"],
        # SlowMo over gossip: a gossip step after every step, an exact outer step every 4.
        "slowmo_ring_h1": [*LOCAL, "sync.period=1", "sync.topology=ring", "sync.exact_every=4",
                           "sync.update=outer", "sync.outer.momentum=0.5"],
    },
}
