//! peft (work in progress).
