"""The asyncio proxy: client sessions, backend connections, routing, pause/resume."""
