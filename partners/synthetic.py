"""Synthetic demo data: a retail bank's clients and a consumer panel's weekly purchases.

Each purchase is also dated within 2026 (`purchased_on`), with a seasonal pattern: travel in
summer, electronics in November and December, fashion at the January and July sales.

The two files overlap partially (the same people under differently formatted emails), some
people refused consent or let it expire, the bank knows an email and a phone per client, and
the panel has several rows per person, so the demo exercises normalisation, identity linking,
consent filtering, the join and contribution bounding. Everything is fictitious.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from entremise.partners.schema import Categorical, Consent, Date, Numeric, UploadSchema

PURPOSE = "audience_insights"
SEGMENTS = ("mass", "affluent", "private")
CATEGORIES = ("grocery", "beauty", "electronics", "fashion", "travel", "leisure")
WEEKS = 12
MAX_ROWS_PER_PANELIST = 12
ASSETS_UPPER = 2_000_000.0
AMOUNT_UPPER = 300.0
YEAR = 2026
#: Relative weight of each month (January first) in each category's purchases, by CATEGORIES.
SEASONS = {
    "grocery": (10, 9, 10, 10, 10, 10, 10, 9, 10, 10, 10, 13),
    "beauty": (8, 12, 9, 9, 10, 9, 9, 8, 9, 9, 11, 16),
    "electronics": (9, 6, 6, 6, 6, 6, 7, 7, 9, 9, 20, 24),
    "fashion": (16, 7, 9, 10, 10, 11, 16, 8, 11, 9, 9, 12),
    "travel": (5, 5, 6, 8, 10, 15, 22, 24, 10, 7, 4, 8),
    "leisure": (6, 6, 8, 10, 12, 14, 13, 10, 9, 8, 6, 7),
}

BANK_SCHEMA = UploadSchema(
    keys={"email": "email", "phone": "phone"},
    consents={PURPOSE: Consent("consent_analytics"), "marketing": Consent("consent_marketing")},
    columns={
        "segment": Categorical(SEGMENTS),
        "investable_assets": Numeric(0.0, ASSETS_UPPER, 1.0),
    },
)

PANEL_SCHEMA = UploadSchema(
    keys={"email": "email"},
    consents={PURPOSE: Consent("consent_analytics", expiry_column="consent_until")},
    columns={
        "week": Categorical(tuple(f"w{w:02d}" for w in range(1, WEEKS + 1))),
        "category": Categorical(CATEGORIES),
        "amount": Numeric(0.0, AMOUNT_UPPER, 0.01),
        "purchased_on": Date(f"{YEAR}-01-01", f"{YEAR}-12-31"),
    },
)


@dataclass(frozen=True)
class SyntheticData:
    """The two partners' raw files (with raw emails and phones: they stay on the partner side)."""

    bank: pd.DataFrame
    panel: pd.DataFrame


def _emails(ids: np.ndarray) -> np.ndarray:
    first = np.array(
        [
            "camille",
            "louis",
            "lea",
            "hugo",
            "chloe",
            "jules",
            "manon",
            "arthur",
            "ines",
            "gabriel",
            "sarah",
            "adam",
            "lina",
            "raphael",
            "emma",
            "nathan",
        ]
    )
    last = np.array(
        [
            "martin",
            "bernard",
            "dubois",
            "thomas",
            "robert",
            "richard",
            "petit",
            "durand",
            "leroy",
            "moreau",
            "simon",
            "laurent",
            "lefebvre",
            "michel",
        ]
    )
    domains = np.array(["example.org", "example.net", "mail.example.com", "demo.example.fr"])
    return np.array(
        [
            f"{first[i % 16]}.{last[(i // 16) % 14]}.{i}@{domains[(i // 7) % 4]}"
            for i in ids.tolist()
        ]
    )


def _phones(ids: np.ndarray) -> np.ndarray:
    # French mobile numbers in the fictional 06 99 range, in mixed national formats.
    out = []
    for i in ids.tolist():
        digits = f"699{i:06d}"[-8:]
        out.append(
            f"06 {digits[:2]} {digits[2:4]} {digits[4:6]} {digits[6:]}"
            if i % 2
            else f"+336{digits}"
        )
    return np.array(out)


def _purchase_dates(categories: np.ndarray, seed: int) -> np.ndarray:
    """An ISO day of YEAR per purchase, its month drawn from its category's SEASONS.

    A generator of its own (from `seed`), so the other columns are the same as without dates.
    """
    rng = np.random.default_rng([seed, YEAR])
    months = np.zeros(len(categories), dtype=np.int64)
    for name, weights in SEASONS.items():
        rows = np.flatnonzero(categories == name)
        p = np.array(weights, dtype=float) / sum(weights)
        months[rows] = rng.choice(12, size=len(rows), p=p)
    starts = np.datetime64(f"{YEAR}-01", "M") + months
    lengths = ((starts + 1).astype("datetime64[D]") - starts.astype("datetime64[D]")).astype(int)
    days = starts.astype("datetime64[D]") + (rng.random(len(categories)) * lengths).astype(int)
    iso: np.ndarray = np.datetime_as_string(days, unit="D")
    return iso


def generate(
    n_bank: int = 200_000, n_panel: int = 50_000, overlap: int = 30_000, seed: int = 7
) -> SyntheticData:
    """Bank clients and panelists; `overlap` people are in both files."""
    if overlap > min(n_bank, n_panel):
        raise ValueError("overlap cannot exceed either file's size")
    rng = np.random.default_rng(seed)
    bank_ids = np.arange(n_bank)
    # Panelists: `overlap` bank clients plus people unknown to the bank.
    shared = rng.choice(bank_ids, size=overlap, replace=False)
    panel_ids = np.concatenate([shared, np.arange(n_bank, n_bank + n_panel - overlap)])

    segment_index = rng.choice(3, size=n_bank, p=[0.70, 0.22, 0.08])
    base = np.array([8_000.0, 120_000.0, 900_000.0])[segment_index]
    assets = np.round(base * rng.lognormal(0.0, 0.6, size=n_bank), 0)
    bank = pd.DataFrame(
        {
            "email": _emails(bank_ids),
            "phone": _phones(bank_ids),
            "segment": np.array(SEGMENTS)[segment_index],
            "investable_assets": assets,  # some above the public bound: clamped by the hub
            "consent_analytics": rng.random(n_bank) < 0.87,
            "consent_marketing": rng.random(n_bank) < 0.60,
        }
    )

    spend_level = np.ones(n_bank + n_panel)
    spend_level[bank_ids] = np.array([1.0, 1.6, 2.2])[segment_index]
    consent = rng.random(len(panel_ids)) < 0.85
    # Consent given until a date: 10% already expired (counts as no consent), 30% still valid.
    horizon = rng.random(len(panel_ids))
    until = np.where(horizon < 0.10, "2024-06-30", np.where(horizon < 0.40, "2099-12-31", ""))
    until_by_person = dict(zip(panel_ids.tolist(), until.tolist(), strict=True))
    rows: list[tuple[int, str, str, float, bool]] = []
    category_mean = np.array([45.0, 30.0, 120.0, 60.0, 150.0, 40.0])
    for person, ok in zip(panel_ids.tolist(), consent.tolist(), strict=True):
        weeks = np.flatnonzero(rng.random(WEEKS) < 0.55)
        taken = 0
        for week in weeks.tolist():
            n_items = 1 if rng.random() < 0.7 else 2
            for category in rng.choice(len(CATEGORIES), size=n_items, replace=False).tolist():
                if taken == MAX_ROWS_PER_PANELIST:
                    break
                amount = category_mean[category] * spend_level[person] * rng.lognormal(-0.1, 0.45)
                rows.append(
                    (person, f"w{week + 1:02d}", CATEGORIES[category], round(float(amount), 2), ok)
                )
                taken += 1
    frame = pd.DataFrame(
        rows, columns=["person", "week", "category", "amount", "consent_analytics"]
    )
    emails = _emails(frame["person"].to_numpy())
    # Same people, other formatting habits: upper case and stray spaces in the panel's file.
    messy = frame["person"].to_numpy() % 5 == 0
    emails = np.where(messy, np.char.add("  ", np.char.upper(emails.astype(str))), emails)
    panel = pd.DataFrame(
        {
            "email": emails,
            "week": frame["week"],
            "category": frame["category"],
            "amount": frame["amount"],
            "purchased_on": _purchase_dates(frame["category"].to_numpy(), seed),
            "consent_analytics": frame["consent_analytics"],
            "consent_until": frame["person"].map(until_by_person),
        }
    )
    return SyntheticData(bank=bank, panel=panel)
