## One peer's timing of one mixed model, for bench/bench_mixed.py: prints a JSON object on the last line.
##
##   Rscript bench/peers_mixed.R <data set> <glmmTMB | lme4>      (from the repository root)
##
## Data sets: cbpp, penicillin, grouseticks, salamanders, sleepstudy, verbagg, insteval, read from the CSVs in
## $DATA (default examples/data) with the factor levels of factor_levels.json: the same data as the Python
## builders in examples/mixed_models.py. Models as in reference/r/glmmtmb_mixed.R: glmmTMB (Laplace, ML,
## REML = FALSE, its default sdreport included) and lme4 (lmer(REML = FALSE), glmer Laplace, glmer.nb for
## nbinom2). Loading the packages and reading the CSV are timed apart; the model is fitted twice in this
## process ("first", "second"), wall seconds.
t_start <- proc.time()[["elapsed"]]
args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 2 || !(args[2] %in% c("glmmTMB", "lme4")))
  stop("usage: Rscript bench/peers_mixed.R <data set> <glmmTMB | lme4>")
name <- args[1]
peer <- args[2]
suppressPackageStartupMessages({
  library(jsonlite)
  if (peer == "glmmTMB") library(glmmTMB) else library(lme4)
})
t_loaded <- proc.time()[["elapsed"]]

specs <- list(
  cbpp = list(formula = cbind(incidence, size - incidence) ~ period + (1 | herd), family = "binomial"),
  penicillin = list(formula = diameter ~ 1 + (1 | plate) + (1 | sample), family = "gaussian"),
  grouseticks = list(formula = TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION),
                     family = "poisson"),
  salamanders = list(formula = count ~ spp + mined + (1 | site), family = "nbinom2"),
  sleepstudy = list(formula = Reaction ~ Days + (Days | Subject), family = "gaussian"),
  verbagg = list(formula = r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), family = "binomial"),
  insteval = list(formula = y ~ service + (1 | s) + (1 | d) + (1 | dept), family = "gaussian"))
if (is.null(specs[[name]])) stop("unknown data set ", name, "; one of ", paste(names(specs), collapse = ", "))
s <- specs[[name]]

data_dir <- Sys.getenv("DATA", "examples/data")
lev <- fromJSON(file.path(data_dir, "factor_levels.json"), simplifyVector = TRUE)
d <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
for (col in names(lev$levels[[name]])) {
  ordered <- !is.null(lev$ordered[[name]]) && col %in% lev$ordered[[name]]
  d[[col]] <- factor(as.character(d[[col]]), levels = lev$levels[[name]][[col]], ordered = ordered)
  stopifnot(!anyNA(d[[col]]))
}
t_read <- proc.time()[["elapsed"]]

fam <- switch(s$family, gaussian = gaussian(), poisson = poisson(), binomial = binomial(),
              nbinom2 = if (peer == "glmmTMB") glmmTMB::nbinom2() else NULL)
fit <- if (peer == "glmmTMB") {
  function() glmmTMB(s$formula, data = d, family = fam, REML = FALSE)
} else if (s$family == "gaussian") {
  function() lmer(s$formula, data = d, REML = FALSE)
} else if (s$family == "nbinom2") {
  function() glmer.nb(s$formula, data = d)
} else {
  function() glmer(s$formula, data = d, family = fam)
}
call <- if (peer == "glmmTMB") "glmmTMB(REML = FALSE)" else switch(
  s$family, gaussian = "lmer(REML = FALSE)", nbinom2 = "glmer.nb", "glmer (Laplace)")

warn <- character(0)
timed <- function() {
  t0 <- proc.time()[["elapsed"]]
  m <- withCallingHandlers(fit(), warning = function(w) {
    warn <<- unique(c(warn, conditionMessage(w))); invokeRestart("muffleWarning")
  })
  list(model = m, seconds = proc.time()[["elapsed"]] - t0)
}
first <- timed()
second <- timed()
m <- second$model
log_lik <- if (peer == "glmmTMB") -m$fit$objective else as.numeric(logLik(m))
n_random <- if (peer == "glmmTMB") length(m$obj$env$random) else nrow(getME(m, "Zt"))
cat(toJSON(list(
  data = name, peer = peer, call = call,
  load_s = t_loaded - t_start, read_s = t_read - t_loaded,
  first_s = first$seconds, second_s = second$seconds,
  logLik = log_lik, nobs = nobs(m), n_random = n_random, warnings = I(warn),
  versions = list(R = paste(R.version$major, R.version$minor, sep = "."),
                  package = format(packageVersion(peer)))),
  auto_unbox = TRUE, digits = NA), "\n")
