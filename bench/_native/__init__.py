"""Frozen copies of the native asyncio and trio adapters of 6324635, kept only to measure the
anyio adapter against them (``--runtime asyncio-native,trio-native``)."""
