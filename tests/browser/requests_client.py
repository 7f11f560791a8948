"""Python `requests` through portcullis, the two ways users configure it: an explicit
`proxies=` mapping and the HTTPS_PROXY environment variable. Prints one JSON line.

usage: requests_client.py PROXY CA_PEM URL_WITH_PROXIES URL_WITH_ENV BLOCKED_URL
"""

import json
import os
import sys

import requests

proxy, ca, url_proxies, url_env, blocked = sys.argv[1:6]
out = {}

r = requests.get(url_proxies, proxies={"https": proxy}, verify=ca, timeout=20)
out["proxies"] = {"status": r.status_code, "body": r.text.strip()}

os.environ["HTTPS_PROXY"] = proxy
with requests.Session() as session:
    r = session.get(url_env, verify=ca, timeout=20)
    out["env"] = {"status": r.status_code, "body": r.text.strip()}

try:
    requests.get(blocked, proxies={"https": proxy}, verify=ca, timeout=20)
    out["blocked"] = "reached"
except requests.exceptions.ProxyError as e:
    out["blocked"] = "ProxyError: " + str(e)

print(json.dumps(out), flush=True)
