package org.sdrs;

/**
 * A model could not be loaded or an image could not be made. The message is the one
 * the {@code sdrs} command line prints for the same problem: it names the file and
 * what is wrong with it, or the setting and what is allowed.
 */
public class SdrsException extends Exception {
    private static final long serialVersionUID = 1L;

    public SdrsException(String message) {
        super(message);
    }
}
