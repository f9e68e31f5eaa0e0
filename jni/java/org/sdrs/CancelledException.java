package org.sdrs;

/** {@link StableDiffusion#generate} stopped because {@link StableDiffusion#cancel} or {@link StableDiffusion#close} was called. */
public class CancelledException extends SdrsException {
    private static final long serialVersionUID = 1L;

    public CancelledException(String message) {
        super(message);
    }
}
