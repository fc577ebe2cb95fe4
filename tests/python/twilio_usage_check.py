"""Lists usage records from tallyd with the official Twilio helper library.

Usage: twilio_usage_check.py BASE_URL ACCOUNT_SID AUTH_TOKEN EXPECTATIONS.json

EXPECTATIONS is a list of cases:
  {"name": ..., "subresource": "records" | "daily" | "monthly" | "all_time" | ...,
   "params": {keyword arguments of .list(), e.g. "category", "start_date"},
   "total": optional number of records the listing must return,
   "records": [{"category", "start_date", "end_date", "count", "usage", "price"}]}

The client talks plain HTTP to BASE_URL instead of https://api.twilio.com and
follows next_page_uri itself, so paging is exercised as Twilio customers do.
Exits non-zero and prints every mismatch if anything differs.
"""

import json
import sys
from decimal import Decimal

from twilio.rest import Client

FIELDS = (
    "account_sid", "api_version", "as_of", "category", "count", "count_unit",
    "description", "end_date", "price", "price_unit", "start_date",
    "subresource_uris", "uri", "usage", "usage_unit",
)


def main():
    base_url, sid, token, expectations_path = sys.argv[1:5]
    with open(expectations_path) as f:
        cases = json.load(f)

    client = Client(sid, token)
    client.api.base_url = base_url
    records_api = client.api.v2010.accounts(sid).usage.records

    failures = []
    for case in cases:
        name = case["name"]
        sub = case["subresource"]
        lister = records_api if sub == "records" else getattr(records_api, sub)
        records = list(lister.list(**case.get("params", {})))

        if "total" in case and len(records) != case["total"]:
            failures.append(f"{name}: {len(records)} records, expected {case['total']}")
        keys = [(r.category, str(r.start_date)) for r in records]
        if len(keys) != len(set(keys)):
            failures.append(f"{name}: a (category, start_date) is listed twice")

        for r in records:
            missing = [f for f in FIELDS if getattr(r, f, None) is None and f != "count"]
            if missing:
                failures.append(f"{name}: {r.category} {r.start_date} lacks {missing}")
            if len(r.subresource_uris) != 8:
                failures.append(f"{name}: subresource_uris has {len(r.subresource_uris)} entries")
            if r.account_sid != sid or r.api_version != "2010-04-01":
                failures.append(f"{name}: account_sid/api_version {r.account_sid} {r.api_version}")

        for exp in case["records"]:
            found = [
                r for r in records
                if r.category == exp["category"] and str(r.start_date) == exp["start_date"]
            ]
            if len(found) != 1:
                failures.append(f"{name}: {exp['category']} {exp['start_date']}: found {len(found)} records")
                continue
            r = found[0]
            got = {
                "end_date": str(r.end_date),
                "count": r.count,
                "usage": r.usage,
                "price": r.price,
                "price_unit": r.price_unit,
            }
            want = {
                "end_date": exp["end_date"],
                "count": exp["count"],
                "usage": exp["usage"],
                "price": Decimal(exp["price"]),
                "price_unit": "usd",
            }
            for field, value in want.items():
                if got[field] != value:
                    failures.append(
                        f"{name}: {exp['category']} {exp['start_date']}: {field} = {got[field]!r}, expected {value!r}"
                    )
        print(f"ok: {name}: {len(records)} records")

    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
