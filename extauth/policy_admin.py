"""A policy bundle revision going live in extauth, as a row of the admin chain (`policy.activate`).

Recorded before the new bundle serves (BundleLoader.before_live): when the row cannot be written the
bundle is refused like an invalid one, the last good one keeps serving, and the next poll tries again.
Every extauth worker loads the bundle on its own; the first to record a set's new digest writes the
row (under the admin chain's lock), the others find it and write nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from audit.admin_changes import POLICY_ACTIVATE, AdminRecorder

ACTOR = "extauth"


def policy_target(set_name: str) -> str:
    return f"policy:{set_name}"


def activation_recorder(dsn: str | None, set_name: str) -> Callable[[Any, Any], Awaitable[None]]:
    """The hook for one set's loader: (loader, new bundle) -> None, or NotRecorded."""
    recorder = AdminRecorder(dsn)

    async def before_live(loader: Any, bundle: Any) -> None:
        st = loader.status
        before = {"revision": st.revision, "digest": st.digest} if st.digest else None
        after = {"set": set_name, "revision": bundle.revision, "digest": bundle.digest, "signed": bundle.signed,
                 "source": loader.source.describe}
        await asyncio.to_thread(recorder.record_once, ACTOR, POLICY_ACTIVATE, policy_target(set_name), before,
                                after, "digest")

    return before_live
