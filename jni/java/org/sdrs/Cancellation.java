package org.sdrs;

import java.util.concurrent.atomic.AtomicLong;

/**
 * Stops the {@link StableDiffusion#generate} calls it was given to, and only those, as
 * Android's {@code CancellationSignal} does: each stops at its next step and throws
 * {@link CancelledException}. Once cancelled it stays cancelled: a call given it later
 * throws at once. One token may serve several calls, on any models and threads.
 *
 * <pre>{@code
 * Cancellation c = new Cancellation();
 * executor.submit(() -> sd.generate(request, listener, c));
 * cancelButton.setOnClickListener(v -> c.cancel());
 * }</pre>
 */
public final class Cancellation {
    private static final AtomicLong NEXT = new AtomicLong();

    /** Read by the native library, which keeps the runs started with each id. */
    private final long id = NEXT.incrementAndGet();
    private volatile boolean cancelled;

    /** Cancels the runs given this token, now and later. Any thread; never waits. */
    public void cancel() {
        // The field first: a run starting now registers itself before it reads it, so
        // one side or the other sees the cancel.
        cancelled = true;
        StableDiffusion.cancelToken(id);
    }

    public boolean isCancelled() {
        return cancelled;
    }
}
