"""Subprocess for the image crash test: opens a store and writes its index image over and over, printing
"ready" once the first write is done, until it is killed."""

from __future__ import annotations

import asyncio
import sys

from edge.store import Store


async def main(path: str) -> None:
    async with Store(path, "UTC") as store:
        async with store._lock:
            await store._write_image_locked()
        print("ready", flush=True)
        n = 0
        while True:
            async with store._lock:
                await store._write_image_locked()
            n += 1
            print(f"written {n}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
