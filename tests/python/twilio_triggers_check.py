"""Manages usage triggers in tallyd with the official Twilio helper library.

Usage: twilio_triggers_check.py BASE_URL ACCOUNT_SID AUTH_TOKEN

Runs against the API test scenario (tests/common: clock at 2025-02-02 15:00
UTC; the account has made 4 calls and spent $0.09 in February). Creates,
lists (following next_page_uri), fetches, updates and deletes triggers as a
Twilio customer's code does, and checks every value that comes back. Leaves
one trigger, named "kept by the helper library". Prints "ok: STEP" per step;
exits non-zero and prints every mismatch if anything differs.
"""

import sys
from datetime import datetime, timezone

from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

HOOK = "https://hooks.example.com/usage?x=1"
CREATED = datetime(2025, 2, 2, 15, 0, 0, tzinfo=timezone.utc)


def main():
    base_url, sid, token = sys.argv[1:4]
    client = Client(sid, token)
    client.api.base_url = base_url
    triggers = client.usage.triggers
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: {got!r}, expected {want!r}")

    # create
    calls = triggers.create(
        callback_url=HOOK,
        trigger_value="+10",
        usage_category="calls",
        trigger_by="count",
        friendly_name="ten more calls",
    )
    expect("relative trigger_value", calls.trigger_value, "14")
    expect("current_value", calls.current_value, "4")
    expect("callback_url", calls.callback_url, HOOK)
    expect("callback_method", calls.callback_method, "POST")
    expect("recurring", calls.recurring, "")
    expect("trigger_by", calls.trigger_by, "count")
    expect("usage_category", calls.usage_category, "calls")
    expect("friendly_name", calls.friendly_name, "ten more calls")
    expect("account_sid", calls.account_sid, sid)
    expect("api_version", calls.api_version, "2010-04-01")
    expect("date_created", calls.date_created, CREATED)
    expect("date_updated", calls.date_updated, CREATED)
    expect("date_fired", calls.date_fired, None)
    expect("uri", calls.uri, f"/2010-04-01/Accounts/{sid}/Usage/Triggers/{calls.sid}.json")
    expect(
        "usage_record_uri",
        calls.usage_record_uri,
        f"/2010-04-01/Accounts/{sid}/Usage/Records.json?Category=calls",
    )
    if not (calls.sid.startswith("UT") and len(calls.sid) == 34):
        failures.append(f"sid {calls.sid!r} is not UT + 32 hex digits")
    spend = triggers.create(
        callback_url=HOOK,
        trigger_value="5.5",
        usage_category="totalprice",
        recurring="monthly",
        trigger_by="price",
        callback_method="GET",
    )
    expect("monthly current_value", spend.current_value, "0.09")
    expect("monthly trigger_value", spend.trigger_value, "5.5")
    expect("monthly recurring", spend.recurring, "monthly")
    expect("monthly callback_method", spend.callback_method, "GET")
    expect(
        "monthly usage_record_uri",
        spend.usage_record_uri,
        f"/2010-04-01/Accounts/{sid}/Usage/Records/Monthly.json?Category=totalprice",
    )
    kept = triggers.create(
        callback_url=HOOK,
        trigger_value="100",
        usage_category="sms",
        friendly_name="kept by the helper library",
    )
    try:
        triggers.create(callback_url=HOOK, trigger_value="-1", usage_category="sms")
        failures.append("a negative trigger_value was accepted")
    except TwilioRestException as e:
        expect("refusal status", e.status, 400)
        if "TriggerValue" not in e.msg:
            failures.append(f"refusal does not name TriggerValue: {e.msg}")
    print("ok: create")

    # list
    created = sorted([calls.sid, spend.sid, kept.sid])
    expect("list", sorted(t.sid for t in triggers.list()), created)
    expect("list, one per page", sorted(t.sid for t in triggers.list(page_size=1)), created)
    expect("list(limit=2)", len(triggers.list(limit=2)), 2)
    expect("list(recurring=monthly)", [t.sid for t in triggers.list(recurring="monthly")], [spend.sid])
    expect("list(trigger_by=count)", [t.sid for t in triggers.list(trigger_by="count")], [calls.sid])
    expect("list(usage_category=sms)", [t.sid for t in triggers.list(usage_category="sms")], [kept.sid])
    listed = {t.sid: t for t in triggers.list()}
    expect("listed trigger_value", listed[calls.sid].trigger_value, "14")
    expect("listed current_value", listed[spend.sid].current_value, "0.09")
    print("ok: list")

    # fetch
    got = triggers(calls.sid).fetch()
    for field in (
        "sid", "account_sid", "api_version", "callback_method", "callback_url",
        "current_value", "date_created", "date_fired", "date_updated",
        "friendly_name", "recurring", "trigger_by", "trigger_value", "uri",
        "usage_category", "usage_record_uri",
    ):
        expect(f"fetched {field}", getattr(got, field), getattr(calls, field))
    print("ok: fetch")

    # update
    updated = triggers(calls.sid).update(friendly_name="renamed", callback_method="GET")
    expect("updated friendly_name", updated.friendly_name, "renamed")
    expect("updated callback_method", updated.callback_method, "GET")
    expect("updated callback_url", updated.callback_url, HOOK)
    updated = triggers(calls.sid).update(callback_url="https://example.org/new")
    expect("updated callback_url", updated.callback_url, "https://example.org/new")
    expect("kept friendly_name", triggers(calls.sid).fetch().friendly_name, "renamed")
    print("ok: update")

    # delete
    expect("delete", triggers(calls.sid).delete(), True)
    expect("delete", triggers(spend.sid).delete(), True)
    try:
        triggers(calls.sid).fetch()
        failures.append("a deleted trigger is still fetched")
    except TwilioRestException as e:
        expect("deleted trigger status", e.status, 404)
    expect("list after delete", [t.sid for t in triggers.list()], [kept.sid])
    print("ok: delete")

    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
