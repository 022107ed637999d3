"""Synthetic benchmark data shared by every benchmark (numpy and pandas only).

Kept free of Entremise imports so that peers benchmarked in their own environment (Tumult
Analytics on Spark) read exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SIZES = {
    "S": (100_000, 5_000, 100_000),
    "M": (1_000_000, 50_000, 5_000_000),
    "L": (10_000_000, 50_000, 10_000_000),
}
SEGMENTS = ("mass", "affluent", "private")
CATEGORIES = tuple(f"c{i:02d}" for i in range(20))
SHOPS = tuple(f"s{i:04d}" for i in range(10_000))
AMOUNT_BOUNDS = (0.0, 500.0)
MAX_ROWS_PER_PERSON = 50


def generate(size: str, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bank clients and panel purchases; half the panelists are bank clients.

    bank: email, ok (consent), segment. panel: email, ok, category, shop, amount.
    """
    n_bank, n_panel, n_rows = SIZES[size]
    rng = np.random.default_rng(seed)
    bank_ids = np.arange(n_bank)
    bank = pd.DataFrame(
        {
            "email": np.char.add(np.char.add("c", bank_ids.astype(str)), "@bank.example.com"),
            "ok": rng.random(n_bank) < 0.9,
            "segment": np.array(SEGMENTS)[rng.choice(3, n_bank, p=[0.7, 0.22, 0.08])],
        }
    )
    panelists = np.concatenate(
        [
            rng.choice(bank_ids, n_panel // 2, replace=False),
            np.arange(n_bank, n_bank + n_panel - n_panel // 2),
        ]
    )
    who = panelists[rng.integers(0, n_panel, n_rows)]
    panel = pd.DataFrame(
        {
            "email": np.char.add(np.char.add("c", who.astype(str)), "@bank.example.com"),
            "ok": rng.random(n_rows) < 0.85,
            "category": np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), n_rows)],
            "shop": np.array(SHOPS)[rng.integers(0, len(SHOPS), n_rows)],
            "amount": np.round(rng.lognormal(3.5, 0.8, n_rows), 2),
        }
    )
    return bank, panel
