pub mod eta;
pub mod reference;
