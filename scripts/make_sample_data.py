"""Write the sample corpus in data/sample/: small, financial-flavoured, fictional text.

Every company, person and number is made up from the word lists below with a
seeded random generator, so the files are reproducible byte for byte:

    python scripts/make_sample_data.py [--out data/sample] [--seed 7]

The templates share vocabulary and arithmetic (a revenue that "rose 12% to
$1.12 billion" came from $1.00 billion), which gives a small model structure to
learn within a minute of CPU training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

QA_ROWS = 1602

FIRST = ["Arden", "Bellmont", "Calder", "Dunmore", "Elston", "Fairhaven", "Granite", "Harbor", "Ironwood",
         "Juniper", "Kestrel", "Lakeshore", "Meridian", "Northgate", "Oakridge", "Pinecrest", "Quarry",
         "Redfield", "Silverline", "Tamarack", "Upland", "Vantage", "Westbrook", "Yarrow", "Zenith"]
SECOND = ["Holdings", "Systems", "Energy", "Bancorp", "Logistics", "Therapeutics", "Foods", "Networks",
          "Materials", "Retail", "Capital", "Semiconductor", "Insurance", "Motors", "Pharma", "Software"]
SECTORS = {
    "Holdings": "industrials", "Systems": "technology", "Energy": "energy", "Bancorp": "banking",
    "Logistics": "transportation", "Therapeutics": "healthcare", "Foods": "consumer staples",
    "Networks": "telecommunications", "Materials": "materials", "Retail": "consumer discretionary",
    "Capital": "financial services", "Semiconductor": "technology", "Insurance": "insurance",
    "Motors": "automotive", "Pharma": "healthcare", "Software": "technology",
}
PRODUCTS = {
    "industrials": ["industrial pumps", "factory automation", "aerospace parts"],
    "technology": ["cloud services", "data-center chips", "enterprise software", "networking gear"],
    "energy": ["natural gas", "offshore drilling", "solar farms", "refined products"],
    "banking": ["commercial loans", "mortgage lending", "deposit accounts", "wealth management"],
    "transportation": ["freight shipping", "warehouse services", "last-mile delivery"],
    "healthcare": ["oncology drugs", "diagnostic tests", "medical devices", "vaccines"],
    "consumer staples": ["packaged snacks", "frozen meals", "beverages"],
    "telecommunications": ["wireless plans", "fiber broadband", "enterprise connectivity"],
    "materials": ["specialty chemicals", "copper", "steel products", "packaging"],
    "consumer discretionary": ["apparel", "home furnishings", "online sales"],
    "financial services": ["asset management", "payments", "brokerage"],
    "insurance": ["property coverage", "life policies", "reinsurance"],
    "automotive": ["electric vehicles", "pickup trucks", "auto parts"],
}
PEOPLE = ["Maria Chen", "David Okafor", "Laura Schmidt", "James Patel", "Sofia Rossi", "Michael Byrne",
          "Aisha Rahman", "Thomas Weber", "Elena Novak", "Robert Tanaka", "Grace Mensah", "Daniel Silva"]
ANALYSTS = ["Hollis & Reed", "Carver Street Research", "Northline Securities", "Blue Quay Partners",
            "Ashford Equity Research", "Tidewater Capital Markets"]
QUARTERS = ["first", "second", "third", "fourth"]
RATINGS = ["buy", "overweight", "hold", "neutral", "underweight", "sell"]
DRIVERS_UP = ["stronger demand for {p}", "higher prices for {p}", "cost savings in {p}",
              "new contracts in {p}", "a recovery in {p}"]
DRIVERS_DOWN = ["weaker demand for {p}", "lower prices for {p}", "higher input costs in {p}",
                "delayed orders in {p}", "inventory build-ups in {p}"]
RISKS = ["rising interest rates", "currency swings", "supply-chain disruption", "regulatory review",
         "customer concentration", "a slowing economy", "competitive pricing", "labour shortages"]


class Company:
    def __init__(self, rng: random.Random, first: str, second: str):
        self.name = f"{first} {second}"
        self.ticker = (first[:2] + second[:2]).upper()
        self.sector = SECTORS[second]
        self.products = PRODUCTS[self.sector]
        self.ceo = rng.choice(PEOPLE)
        self.cfo = rng.choice([p for p in PEOPLE if p != self.ceo])
        self.base_revenue_m = rng.choice([120, 250, 480, 900, 1500, 3200, 7800])


def money(millions: float) -> str:
    if millions >= 1000:
        return f"${millions / 1000:.2f} billion"
    return f"${millions:.1f} million"


def change_words(pct: float) -> str:
    return "rose" if pct >= 0 else "fell"


class Quarter:
    """One company's quarter: consistent numbers that every template reads from."""

    def __init__(self, rng: random.Random, company: Company):
        self.company = company
        self.quarter = rng.choice(QUARTERS)
        self.year = rng.randint(2019, 2025)
        self.growth_pct = round(rng.gauss(4, 9), 1)
        self.prior_m = company.base_revenue_m * rng.uniform(0.8, 1.25)
        self.revenue_m = self.prior_m * (1 + self.growth_pct / 100)
        self.margin_pct = round(rng.uniform(3, 28), 1)
        self.net_m = self.revenue_m * self.margin_pct / 100
        self.eps = round(self.net_m / rng.choice([40, 90, 150, 300]), 2)
        self.eps_est = round(self.eps * rng.uniform(0.85, 1.12), 2)
        self.product = rng.choice(company.products)
        template = rng.choice(DRIVERS_UP if self.growth_pct >= 0 else DRIVERS_DOWN)
        self.driver = template.format(p=self.product)
        self.guidance_pct = round(self.growth_pct + rng.gauss(0, 3), 1)
        self.move_pct = round((self.eps - self.eps_est) / max(self.eps_est, 0.01) * 40 + rng.gauss(0, 2), 1)
        self.risk = rng.choice(RISKS)

    @property
    def beat(self) -> str:
        if self.eps > self.eps_est:
            return "beat"
        return "matched" if self.eps == self.eps_est else "missed"


def news_brief(rng: random.Random, q: Quarter) -> str:
    c = q.company
    move = "rose" if q.move_pct >= 0 else "fell"
    openers = [
        f"{c.name} ({c.ticker}) reported {q.quarter}-quarter revenue of {money(q.revenue_m)}, "
        f"which {change_words(q.growth_pct)} {abs(q.growth_pct)}% from {money(q.prior_m)} a year earlier.",
        f"Shares of {c.name} {move} {abs(q.move_pct)}% after the {c.sector} company said {q.quarter}-quarter "
        f"revenue {change_words(q.growth_pct)} {abs(q.growth_pct)}% to {money(q.revenue_m)}.",
        f"{c.ticker} {move} {abs(q.move_pct)}% in early trading. {c.name} earned ${q.eps:.2f} a share in the "
        f"{q.quarter} quarter, compared with analyst estimates of ${q.eps_est:.2f}.",
    ]
    middles = [
        f"Earnings per share of ${q.eps:.2f} {q.beat} the consensus estimate of ${q.eps_est:.2f}.",
        f"Chief executive {c.ceo} credited {q.driver}.",
        f"The company pointed to {q.driver} as the main reason for the change.",
        f"Net income was {money(q.net_m)}, a margin of {q.margin_pct}%.",
        f"Chief financial officer {c.cfo} said the company expects revenue growth of about "
        f"{q.guidance_pct}% next year.",
    ]
    closers = [
        f"Analysts at {rng.choice(ANALYSTS)} rate the stock {rng.choice(RATINGS)}.",
        f"Investors are watching {q.risk}.",
        f"The stock {move} {abs(q.move_pct)}% on the day.",
        f"Other {c.sector} shares were little changed.",
    ]
    parts = [rng.choice(openers)] + rng.sample(middles, rng.randint(2, 4)) + [rng.choice(closers)]
    return " ".join(parts)


def filing_paragraph(rng: random.Random, q: Quarter) -> str:
    c = q.company
    kind = rng.choice(["results", "segment", "liquidity", "risk", "outlook"])
    if kind == "results":
        return (f"For the {q.quarter} quarter of fiscal {q.year}, {c.name} reported total revenue of "
                f"{money(q.revenue_m)}, compared with {money(q.prior_m)} in the same quarter of fiscal "
                f"{q.year - 1}, {'an increase' if q.growth_pct >= 0 else 'a decrease'} of {abs(q.growth_pct)}%. "
                f"The change primarily reflects {q.driver}. Net income for the quarter was {money(q.net_m)}, "
                f"or ${q.eps:.2f} per diluted share, representing a net margin of {q.margin_pct}%.")
    if kind == "segment":
        share = rng.randint(35, 80)
        return (f"Revenue from {q.product} accounted for {share}% of total revenue in the quarter, "
                f"and the remaining {100 - share}% came from {rng.choice([p for p in c.products if p != q.product] or c.products)}. "
                f"Management evaluates segment performance on operating income before corporate costs. "
                f"Operating income in the {q.product} segment {change_words(q.growth_pct)} compared with the prior year.")
    if kind == "liquidity":
        cash = q.revenue_m * rng.uniform(0.1, 0.6)
        debt = q.revenue_m * rng.uniform(0.2, 1.5)
        return (f"As of the end of the quarter, {c.name} held cash and cash equivalents of {money(cash)} and "
                f"total debt of {money(debt)}. We believe that cash on hand, cash generated from operations and "
                f"available borrowing capacity will be sufficient to meet our liquidity needs for at least the "
                f"next twelve months. During the quarter we {'repurchased' if rng.random() < 0.5 else 'did not repurchase'} "
                f"shares of common stock.")
    if kind == "risk":
        return (f"Our results may be adversely affected by {q.risk}. In particular, {q.risk} could reduce demand "
                f"for {q.product} or increase our costs. We may not be able to pass higher costs on to customers, "
                f"and our margins could decline. These risks are described in more detail in our annual report.")
    return (f"For fiscal {q.year + 1}, management expects revenue growth of approximately {q.guidance_pct}% "
            f"and an operating margin between {max(q.margin_pct - 2, 1):.1f}% and {q.margin_pct + 2:.1f}%. "
            f"This outlook assumes no significant change in {q.risk}. Actual results may differ materially.")


def report_note(rng: random.Random, q: Quarter) -> str:
    c = q.company
    rating = rng.choice(RATINGS)
    target = round(rng.uniform(15, 300), 0)
    return (f"{rng.choice(ANALYSTS)} | {c.name} ({c.ticker}) | Rating: {rating.upper()} | Price target: ${target:.0f}. "
            f"Thesis: {c.name} is a {c.sector} name with exposure to {q.product}. "
            f"{q.quarter.capitalize()}-quarter EPS of ${q.eps:.2f} {q.beat} our ${q.eps_est:.2f} estimate "
            f"on {q.driver}. We model revenue growth of {q.guidance_pct}% next year with a net margin near "
            f"{q.margin_pct}%. Key risk: {q.risk}. "
            + rng.choice([f"We reiterate our {rating} rating.", f"We move to {rating} from our prior view.",
                          f"Our {rating} rating reflects valuation and {q.risk}."]))


def qa_pair(rng: random.Random, q: Quarter) -> dict:
    c = q.company
    kind = rng.randrange(6)
    if kind == 0:
        question = (f"{c.name} had revenue of {money(q.prior_m)} last year and {money(q.revenue_m)} this year. "
                    f"By what percentage did revenue change?")
        answer = f"Revenue {change_words(q.growth_pct)} by about {abs(q.growth_pct)}%."
    elif kind == 1:
        question = f"{c.name} reported EPS of ${q.eps:.2f} against an estimate of ${q.eps_est:.2f}. Did it beat?"
        answer = {"beat": f"Yes. ${q.eps:.2f} is above the ${q.eps_est:.2f} estimate, so it beat.",
                  "missed": f"No. ${q.eps:.2f} is below the ${q.eps_est:.2f} estimate, so it missed.",
                  "matched": "It matched the estimate exactly."}[q.beat]
    elif kind == 2:
        question = f"What sector is {c.name} in, and what does it sell?"
        answer = f"{c.name} is a {c.sector} company; its products include {', '.join(c.products)}."
    elif kind == 3:
        question = f"What is the ticker symbol of {c.name}?"
        answer = f"The ticker symbol of {c.name} is {c.ticker}."
    elif kind == 4:
        question = f"A company with revenue of {money(q.revenue_m)} has a net margin of {q.margin_pct}%. What is its net income?"
        answer = f"Net income is about {money(q.net_m)} ({q.margin_pct}% of {money(q.revenue_m)})."
    else:
        question = f"Name one risk that could hurt {c.name}'s results."
        answer = f"One risk is {q.risk}, which could reduce demand for {q.product} or raise costs."
    return {"question": question, "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "sample")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    companies = [Company(rng, f, s) for f in FIRST for s in rng.sample(SECOND, 4)]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def quarter() -> Quarter:
        return Quarter(rng, rng.choice(companies))

    with open(out / "news.jsonl", "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"text": news_brief(rng, quarter())}) + "\n")
    with open(out / "filings.txt", "w") as f:
        f.write("\n\n".join(filing_paragraph(rng, quarter()) for _ in range(2000)) + "\n")
    notes = [report_note(rng, quarter()) for _ in range(1500)]
    pq.write_table(pa.table({"text": notes}), out / "reports.parquet", compression="zstd")
    with open(out / "qa.jsonl", "w") as f:
        for _ in range(QA_ROWS):
            f.write(json.dumps(qa_pair(rng, quarter())) + "\n")


if __name__ == "__main__":
    main()
