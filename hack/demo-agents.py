#!/usr/bin/env python3
"""The demo's view of its agents, read from each mesh-agent's test API (agent i serves 127.0.2.(i+1):9465).

  --links I...              each agent's open links (dialed/accepted), its high-water mark, the rendezvous link
  --check-links I...        exit 0 iff every agent holds exactly the links of its applied assignment (and some)
  --updates I...            the outage updates each agent has, with their delivery latency
  --check-updates N I...    exit 0 iff every agent has at least N updates written during the outage
"""
import json
import sys
import urllib.request

OUTAGE = "during the outage"


def get(i, path):
    with urllib.request.urlopen(f"http://127.0.2.{i + 1}:9465{path}", timeout=5) as r:
        return json.load(r)


def links(ids):
    worst = 0
    for i in ids:
        s = get(i, "/status")
        dialed = sum(1 for l in s["links"] if l["direction"] == "dialed")
        accepted = len(s["links"]) - dialed
        worst = max(worst, s["maxOpenLinks"])
        rv = "up" if s["rendezvousConnected"] else "down"
        print(f"agent-{i:<3} {len(s['links'])} links ({dialed} dialed, {accepted} accepted)"
              f"  most at once: {s['maxOpenLinks']}  rendezvous: {rv}")
    print(f"most links any agent held at once: {worst}")


def check_links(ids):
    for i in ids:
        s = get(i, "/status")
        held = sorted(l["nodeId"] for l in s["links"])
        if not s.get("planned") or held != sorted(s["planned"]):
            return 1
    return 0


def outage_updates(i):
    return [u for u in get(i, "/updates") if u.get("value") == OUTAGE]


def updates(ids):
    for i in ids:
        seen = ", ".join(f"{u['key']} after {u['firstSeenMs'] - u['writtenAtMs']:.0f} ms" for u in outage_updates(i))
        print(f"agent-{i:<3} {seen}")


def main(argv):
    mode, rest = argv[1], argv[2:]
    try:
        if mode == "--links":
            links(map(int, rest))
        elif mode == "--check-links":
            return check_links(map(int, rest))
        elif mode == "--updates":
            updates(map(int, rest))
        elif mode == "--check-updates":
            n = int(rest[0])
            return 0 if all(len(outage_updates(int(i))) >= n for i in rest[1:]) else 1
        else:
            print(__doc__)
            return 2
    except OSError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
