"""A WebSocket session through portcullis with Python's `websockets` (>= 15, which speaks HTTP
CONNECT to a proxy itself): send a message every `interval` seconds for `seconds`, check every
echo, count the ticks the origin pushes on its own, and print one JSON summary line.

usage: ws_session.py URL PROXY CA_PEM SECONDS
"""

import asyncio
import json
import ssl
import sys
import time

from websockets.asyncio.client import connect


async def main(url, proxy, ca, seconds, interval=0.5):
    context = ssl.create_default_context(cafile=ca)
    sent = echoed = ticks = 0
    started = time.monotonic()
    async with connect(url, proxy=proxy, ssl=context, open_timeout=20) as ws:
        async def sender():
            nonlocal sent
            while time.monotonic() - started < seconds:
                await ws.send(f"py {sent}")
                sent += 1
                await asyncio.sleep(interval)

        async def receiver():
            nonlocal echoed, ticks
            async for message in ws:
                if message.startswith("tick "):
                    ticks += 1
                elif message == f"py {echoed}":
                    echoed += 1
                else:
                    raise RuntimeError(f"expected echo 'py {echoed}', got {message!r}")
            raise RuntimeError(f"closed after {echoed} echoes")

        receiving = asyncio.create_task(receiver())
        await sender()
        # The minute is up: wait for the last echoes.
        deadline = time.monotonic() + 20
        while echoed < sent:
            if receiving.done():
                receiving.result()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{echoed} of {sent} echoes")
            await asyncio.sleep(0.05)
        receiving.cancel()
    print(json.dumps({
        "sent": sent,
        "echoed": echoed,
        "ticks": ticks,
        "seconds": round(time.monotonic() - started, 1),
    }), flush=True)


if __name__ == "__main__":
    url, proxy, ca, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    asyncio.run(main(url, proxy, ca, seconds))
