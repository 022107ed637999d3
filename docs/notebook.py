# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # An analyst's session in SQL
#
# An analyst queries an agreement's consented join of a bank's clients and a panel's
# purchases. Every answer is a differentially private aggregate: each costs part of the
# agreement's budget, comes with its 95% interval, and no row ever leaves the hub.
#
# Open it with `jupytext --to notebook docs/notebook.py`, or run it as a script. It reads:
#
# - `ENTREMISE_TARGET`: the hub's address (default `127.0.0.1:50051`);
# - `ENTREMISE_TOKEN`: the analyst's API token;
# - `ENTREMISE_AGREEMENT`: the agreement id (optional: by default, the one active agreement
#   whose datasets the query's FROM names);
# - `ENTREMISE_PLOT`: where to save the plot (default `spend_by_segment.png`).

# %%
import os

import matplotlib

matplotlib.use("Agg")  # save to a file, never open a window
import matplotlib.pyplot as plt

import entremise
from entremise.sdk import SqlRefusal

hub = entremise.connect(
    os.environ.get("ENTREMISE_TARGET", "127.0.0.1:50051"),
    token=os.environ["ENTREMISE_TOKEN"],
    agreement=os.environ.get("ENTREMISE_AGREEMENT") or None,
)

# %% [markdown]
# ## The agreements and their budget
#
# One row per agreement you are an analyst of: its datasets (the tables of FROM) and the
# budget left.

# %%
agreements = hub.agreements()
print(agreements[["agreement_id", "status", "datasets", "measure", "remaining"]])

# %% [markdown]
# ## Preview: what a query costs and how accurate it is, for free
#
# Counts and sums have their 95% half-width before release. A mean's depends on its cell's
# row count, so the preview bounds it at 1,000 rows (`ci95_at_1000_rows`; the release gives
# each cell its own).

# %%
SPEND = """
SELECT bank.segment AS segment,
       COUNT(DISTINCT person) AS people,
       AVG(panel.amount) AS spend
FROM bank JOIN panel
GROUP BY bank.segment
"""
plan = hub.preview(SPEND, epsilon=0.5)
print(plan[["name", "kind", "share", "mechanism", "ci95", "ci95_at_1000_rows"]])
print(
    f"cost {plan.attrs['cost']} over {plan.attrs['cells']} cells; budget "
    f"{plan.attrs['remaining_before']} -> {plan.attrs['remaining_after']}"
)
people_ci95 = float(plan.set_index("name").loc["people", "ci95"])
print(f"each segment's number of people will be within +/-{people_ci95:.0f}, 95% of the time")

# %% [markdown]
# ## Run it
#
# One row per segment; each aggregate comes with `_low` and `_high`, its 95% interval.

# %%
spend = hub.sql(SPEND, epsilon=0.5)
print(spend)
print(f"release {spend.attrs['release_id']}: spent {spend.attrs['epsilon']}, "
      f"remaining {spend.attrs['remaining']}")

# %% [markdown]
# ## Plot it, with its intervals

# %%
plot_path = os.environ.get("ENTREMISE_PLOT", "spend_by_segment.png")
fig, ax = plt.subplots(figsize=(6, 3.5))
errors = [spend["spend"] - spend["spend_low"], spend["spend_high"] - spend["spend"]]
ax.bar(spend["segment"], spend["spend"], yerr=errors, capsize=4, color="#4c72b0")
ax.set_ylabel("mean purchase (95% interval)")
ax.set_title("Mean purchase per bank segment (differentially private)")
fig.tight_layout()
fig.savefig(plot_path)
plt.close(fig)
print(f"saved {plot_path}")

# %% [markdown]
# ## A grouped query with HAVING, ORDER BY and LIMIT
#
# The hub releases every category (empty ones too); HAVING, ORDER BY and LIMIT then act on the
# noisy values, on this side: post-processing, which costs nothing more.

# %%
TOP = """
SELECT panel.category AS category,
       COUNT(*) /* accuracy 400 */ AS purchases,
       SUM(panel.amount) AS total
FROM bank JOIN panel
WHERE bank.segment IN ('affluent', 'private') AND panel.amount >= 5
GROUP BY 1
HAVING COUNT(*) > 0
ORDER BY total DESC
LIMIT 3
"""
top = hub.sql(TOP, epsilon=1)
print(top[["category", "purchases", "total", "total_low", "total_high"]])

# %% [markdown]
# ## What SQL cannot ask
#
# Anything that would release rows, or that the hub cannot answer privately, is refused in one
# line before anything is sent.

# %%
try:
    hub.sql("SELECT panel.amount FROM bank JOIN panel", epsilon=0.1)
except SqlRefusal as refusal:
    refused = str(refusal)
    print(f"refused: {refused}")

# %%
budget = hub.budget()
print(budget)
hub.close()
